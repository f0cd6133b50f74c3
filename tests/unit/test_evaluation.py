"""Tests for minidistill.generation.evaluation and eval/instruct_eval.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_tokenizer import make_tokenizer, tiny_llama  # noqa: E402

from minidistill.data import Example  # noqa: E402
from minidistill.errors import UserError  # noqa: E402
from minidistill.generation.evaluation import evaluate_instructions, generate, mean_rouge_l, rouge_l  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["Hello there", "A", "The quick brown fox jumps", "Once upon a time"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok, seed=0)


# ------------------------------------------------------------------ ROUGE-L


def test_rouge_l_hand_computed():
    assert rouge_l("the cat sat", "the cat sat") == pytest.approx(100.0)
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    # LCS "the cat on mat" = 4 of 6 tokens each way: P = R = F = 2/3
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(200 / 3)
    # LCS "a c": P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(400 / 7)
    # stemming ("killed" -> "kill") and case/punctuation normalisation
    assert rouge_l("Police kill the gunman!", "police killed the gunman") == pytest.approx(100.0)


def test_rouge_l_max_over_references_and_mean():
    assert rouge_l("a b c d", ["gamma", "a c e", "a b c d"]) == pytest.approx(100.0)
    assert rouge_l("a b c d", ["gamma", "a c e"]) == pytest.approx(400 / 7)
    assert mean_rouge_l(["x y", "a b c d"], ["x y", ["a c e"]]) == pytest.approx((100 + 400 / 7) / 2)
    with pytest.raises(ValueError):
        rouge_l("a", [])


# ------------------------------------------------------------------ generation


def test_generate_restores_order_and_left_padding_is_correct(model, tok):
    batched = generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=3, temperature=0, progress=False)
    alone = [
        generate(model, tok, [p], max_new_tokens=5, batch_size=1, temperature=0, progress=False)[0] for p in PROMPTS
    ]
    assert batched == alone
    assert len(set(batched)) > 1  # different prompts, different continuations


def test_generate_sampling_is_deterministic(model, tok):
    kw = dict(max_new_tokens=6, batch_size=3, progress=False)
    first = generate(model, tok, PROMPTS, seed=10, **kw)
    assert generate(model, tok, PROMPTS, seed=10, **kw) == first
    assert generate(model, tok, PROMPTS, seed=20, **kw) != first
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert generate(model, tok, ids, seed=10, **kw) == first  # id lists behave like strings
    assert all(isinstance(s, str) and s == s.strip() for s in first)


def test_generate_checks_context(tok):
    small = tiny_llama(tok, max_positions=16)
    with pytest.raises(UserError, match="exceeds the model's context of 16"):
        generate(small, tok, ["x" * 10], max_new_tokens=8, batch_size=1, progress=False)


def test_evaluate_instructions(model, tok):
    exs = [
        Example("Say hi", "", ["hi"]),
        Example("Count", "1 2", ["3 4", "three four"]),
        Example("z" * 300, "", ["long"]),
    ]
    res = evaluate_instructions(
        model, tok, exs, seeds=[10, 20], max_prompt_length=256, max_new_tokens=4, batch_size=2, progress=False
    )
    assert res["n_examples"] == 2 and res["n_dropped_long_prompt"] == 1
    assert set(res["rougeL_per_seed"]) == {10, 20}
    assert res["rougeL"] == pytest.approx(sum(res["rougeL_per_seed"].values()) / 2)
    assert 0 < res["mean_length"] <= 4
    gens = res["generations"]
    assert len(gens) == 4 and {g["seed"] for g in gens} == {10, 20}
    assert gens[1]["references"] == ["3 4", "three four"] and gens[1]["prompt"].endswith("### Response:\n")
    assert all(g["rougeL"] == pytest.approx(rouge_l(g["generation"], g["references"])) for g in gens)


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tok, model):
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_data(path: Path) -> Path:
    records = [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Name two numbers", "input": "1 2", "output": ["1 2", "one two"]},
        {"instruction": "Repeat", "input": "abc", "output": "abc"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_end_to_end(tmp_path, saved_model):
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "eval/instruct_eval.py",
            "--model",
            str(saved_model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--seeds",
            "10,20",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "2",
            "--max-examples",
            "2",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert isinstance(summary["rougeL"], float)
    assert set(summary["rougeL_per_seed"]) == {"10", "20"}
    assert summary["n_examples"] == 2 and summary["settings"]["no_repeat_ngram_size"] == 6
    assert summary["settings"]["top_k"] == 0 and summary["data"] == str(data)
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"seed", "prompt", "references", "generation"} <= set(rows[0])
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    assert "ROUGE-L" in proc.stdout


def load_cli():
    spec = importlib.util.spec_from_file_location("instruct_eval", REPO / "eval" / "instruct_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_user_errors_exit_2(tmp_path, saved_model, capsys):
    cli = load_cli()
    code = cli.main(["--model", str(saved_model), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "missing.jsonl: file not found" in err
    data = write_data(tmp_path / "d.jsonl")
    code = cli.main(["--model", str(saved_model), "--data", str(data), "--out", str(tmp_path), "--seeds", "a,b"])
    assert code == 2 and "--seeds" in capsys.readouterr().err

"""Tests for minidistill.reporting.analysis (metrics pinned to hand-computed values) and eval/analyze.py."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_tokenizer import make_tokenizer, tiny_llama  # noqa: E402

from minidistill.reporting import analysis as A  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def student(tok):
    return tiny_llama(tok, seed=0)


@pytest.fixture(scope="module")
def teacher(tok):
    """A different tiny model with peaked next-token distributions (scaled tied embeddings)."""
    m = tiny_llama(tok, seed=1)
    with torch.no_grad():
        m.get_input_embeddings().weight.mul_(8.0)
    return m


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ Dist-n


def test_distinct_n_hand_computed():
    # 4-grams: (a b c d), (b c d e) | (a b c d): 2 distinct of 3 pooled; each text alone is all-distinct
    texts = ["a b c d e", "a b c d"]
    assert A.distinct_n(texts, 4) == pytest.approx(2 / 3)
    assert A.distinct_n(texts, 4, average="per_text") == pytest.approx(1.0)
    # whitespace tokens, case and punctuation kept: "x x x x x" has (x x x x) twice
    assert A.distinct_n(["x x x x x"], 4) == pytest.approx(1 / 2)
    assert A.distinct_n(["the cat the", "The  cat\tthe."], 1) == pytest.approx(4 / 6)
    assert A.distinct_n(["too short"], 4) == 0.0 and A.distinct_n([], 4) == 0.0
    # texts shorter than n are skipped, not counted as 0 in the per-text mean
    assert A.distinct_n(["a a a a a", "short"], 4, average="per_text") == pytest.approx(0.5)
    # pre-tokenized sequences (token ids)
    assert A.distinct_n([[1, 2, 1, 2, 1]], 2) == pytest.approx(2 / 4)
    with pytest.raises(ValueError):
        A.distinct_n(["a"], 0)


# ------------------------------------------------------------------ ECE


def test_ece_hand_computed():
    conf = [0.95, 0.95, 0.55, 0.25]
    correct = [1, 0, 1, 0]
    # bins (0.9,1]: acc 0.5 conf 0.95 (2 of 4); (0.5,0.6]: acc 1 conf 0.55; (0.2,0.3]: acc 0 conf 0.25
    expected = 2 / 4 * 0.45 + 1 / 4 * 0.45 + 1 / 4 * 0.25
    assert A.ece_from_confidences(conf, correct, 10) == pytest.approx(expected)
    # one bin: |mean acc - mean conf|
    assert A.ece_from_confidences(conf, correct, 1) == pytest.approx(abs(0.5 - 2.7 / 4))
    # perfectly calibrated bins give 0
    assert A.ece_from_confidences([0.5, 0.5, 1.0], [1, 0, 1], 10) == pytest.approx(0.0)
    assert A.ece_from_confidences([], [], 10) == 0.0


def test_reliability_bins_edges():
    bins = A.reliability_bins(torch.tensor([0.0, 0.1, 0.1001, 1.0]), torch.tensor([True, False, True, True]), 10)
    assert [b["count"] for b in bins] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]  # right-closed bins, 0 in the first
    assert bins[0]["accuracy"] == pytest.approx(0.5) and bins[0]["confidence"] == pytest.approx(0.05)
    assert bins[2]["accuracy"] is None and bins[9]["lo"] == pytest.approx(0.9)
    with pytest.raises(ValueError):
        A.reliability_bins([1.5], [1])


# ------------------------------------------------------------------ ExAccErr


def test_exaccerr_curve_constructed_case():
    # two free-run sequences (the second ends after 1 step), two oracle sequences
    student = [[1.0, 1.0, 1.0], [1.0]]
    teacher = [[0.5, 0.5, 0.5], [0.5, 0.5]]
    out = A.exaccerr_curve(student, teacher, [1, 2, 3])
    assert out["R"] == pytest.approx([1.0, 1.5, 2.0])  # mean of accumulated sums, 0 past the end
    assert out["l_eps"] == pytest.approx([0.5, 1.0, 1.25])
    assert out["eps"] == pytest.approx([0.5, 0.5, 1.25 / 3])
    assert out["exaccerr"] == pytest.approx([100.0, 50.0, 60.0])  # (R - l eps) / (l eps) * 100
    assert out["student_running"] == pytest.approx([1.0, 0.5, 0.5])
    assert out["teacher_running"] == pytest.approx([1.0, 1.0, 0.5])
    # no oracle error: undefined ratio -> None
    assert A.exaccerr_curve([[0.0]], [[0.0]], [1])["exaccerr"] == [None]


# ------------------------------------------------------------------ token-level KL


def test_kl_per_position_hand_computed():
    q = torch.tensor([0.5, 0.5])
    p = torch.tensor([0.25, 0.75])
    rkl, fkl = A.kl_per_position(q.log()[None], p.log()[None] + 3.0)  # logits: any offset
    assert float(rkl[0]) == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), abs=1e-6)
    assert float(fkl[0]) == pytest.approx(0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5), abs=1e-6)


def direct_kl(model, teacher, prompt, response):
    """Unpadded, one example at a time: sums of reverse and forward KL over the response positions."""
    x = torch.tensor([prompt + response])
    with torch.no_grad():
        lq = torch.log_softmax(model(x).logits[0, len(prompt) - 1 : -1].float(), -1)
        lp = torch.log_softmax(teacher(x).logits[0, len(prompt) - 1 : -1].float(), -1)
    return float((lq.exp() * (lq - lp)).sum()), float((lp.exp() * (lp - lq)).sum())


def pairs(tok):
    prompts = [ids(tok, "Hello there"), ids(tok, "A"), ids(tok, "The quick brown fox jumps")]
    responses = [ids(tok, " world") + [tok.eos_token_id], ids(tok, "bc de fgh"), [tok.eos_token_id]]
    return prompts, responses


def test_token_kl_self_zero_other_positive_and_direct(student, teacher, tok):
    prompts, responses = pairs(tok)
    batch = A.collate_pairs(prompts, responses, tok.pad_token_id)
    self_kl = A.token_kl(student, student, *batch)
    assert self_kl["reverse_kl"] == pytest.approx(0.0, abs=1e-6) and self_kl["forward_kl"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert self_kl["n_tokens"] == sum(len(r) for r in responses)

    got = A.token_kl(student, teacher, *batch)
    sums = [direct_kl(student, teacher, p, r) for p, r in zip(prompts, responses)]
    n = sum(len(r) for r in responses)
    assert got["reverse_kl"] > 0.01 and got["forward_kl"] > 0.01
    assert got["reverse_kl"] == pytest.approx(sum(s[0] for s in sums) / n, rel=1e-4)
    assert got["forward_kl"] == pytest.approx(sum(s[1] for s in sums) / n, rel=1e-4)

    # the list wrapper gives the same pooled values for any batch size, and per-sequence sums
    for bs in (1, 2):
        lst = A.response_kl(student, teacher, prompts, responses, pad_id=tok.pad_token_id, batch_size=bs)
        assert lst["reverse_kl"] == pytest.approx(got["reverse_kl"], rel=1e-4)
        assert lst["forward_kl"] == pytest.approx(got["forward_kl"], rel=1e-4)
        for (r, f), (sr, sf) in zip(lst["per_sequence"], sums):
            assert sum(r) == pytest.approx(sr, rel=1e-4, abs=1e-6) and sum(f) == pytest.approx(sf, rel=1e-4, abs=1e-6)


def test_calibration_ece_matches_direct(student, teacher, tok):
    prompts, responses = pairs(tok)
    conf, correct = [], []
    for p, r in zip(prompts, responses):
        with torch.no_grad():
            probs = torch.softmax(teacher(torch.tensor([p + r])).logits[0, len(p) - 1 : -1].float(), -1)
        c, pred = probs.max(-1)
        conf += c.tolist()
        correct += (pred == torch.tensor(r)).tolist()
    out = A.calibration_ece(teacher, prompts, responses, pad_id=tok.pad_token_id, n_bins=10, batch_size=2)
    assert out["n_tokens"] == len(conf)
    assert out["ece"] == pytest.approx(A.ece_from_confidences(conf, correct, 10), abs=1e-5)
    assert out["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert out["mean_confidence"] == pytest.approx(sum(conf) / len(conf), abs=1e-5)
    assert sum(b["count"] for b in out["bins"]) == len(conf)


# ------------------------------------------------------------------ exposure bias on models


def test_exposure_bias_models(student, teacher, tok):
    prompts = [ids(tok, "Hello there"), ids(tok, "A"), ids(tok, "Once upon a time")]
    res, s, t = A.exposure_bias(
        student, teacher, tok, prompts, [2, 4, 8], seeds=[1, 2], batch_size=2, return_samples=True
    )
    assert res["lengths"] == [2, 4, 8] and res["n_student_sequences"] == 6 == res["n_teacher_sequences"]
    # the reported curve is exactly exaccerr_curve of the per-step forward KLs of the two sample sets
    again = A.exaccerr_curve(s.fkl, t.fkl, [2, 4, 8])
    assert res["R"] == pytest.approx(again["R"]) and res["exaccerr"] == pytest.approx(again["exaccerr"])
    assert all(a <= b + 1e-9 for a, b in zip(res["R"], res["R"][1:])) and res["R"][0] > 0
    assert len(res["curve"]["R"]) == 8 and res["curve"]["R"][1] == pytest.approx(res["R"][0])
    # the same result from the already scored samples (what eval/analyze.py calls), lengths sorted and deduplicated
    from_samples = A.exposure_bias_from(s, t, [8, 2, 4, 2], seeds=[1, 2], max_new_tokens=8)
    assert from_samples["lengths"] == [2, 4, 8] and from_samples["R"] == res["R"]
    assert from_samples["curve"] == res["curve"] and from_samples["teacher_samples"] == res["teacher_samples"]
    # one scored step per generated token, plus the EOS prediction when the sample ended
    for resp, ended, f in zip(s.responses, s.ended, s.fkl):
        assert len(f) == len(resp) + int(ended) and len(resp) <= 8
    # the per-step errors are the teacher-forced forward KL on the sample itself
    k = 0
    r = s.responses[k] + ([tok.eos_token_id] if s.ended[k] else [])
    assert sum(s.fkl[k]) == pytest.approx(direct_kl(student, teacher, prompts[s.prompt_index[k]], r)[1], rel=1e-4)
    # a model against itself: no error at all, ExAccErr undefined
    same = A.exposure_bias(student, student, tok, prompts[:1], [2], seeds=[1])
    assert same["R"] == pytest.approx([0.0], abs=1e-6) and same["exaccerr"] == [None]


# ------------------------------------------------------------------ CLI


def write_data(path: Path) -> Path:
    records = [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Name two numbers", "input": "1 2", "output": ["1 2", "one two"]},
        {"instruction": "Repeat", "input": "abc", "output": "abc"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_analyze_cli_end_to_end(tmp_path, tiny_dir, sharp_dir):
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "eval/analyze.py",
            "--model",
            str(tiny_dir),
            "--teacher",
            str(sharp_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--seeds",
            "10,20",
            "--max-new-tokens",
            "6",
            "--lengths",
            "2,4,8",
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
    a = json.loads((out / "analysis.json").read_text())
    assert {
        "reverse_kl",
        "forward_kl",
        "distinct_4",
        "ece",
        "exaccerr",
        "mean_length",
        "samples",
        "teacher_samples",
        "reference",
        "calibration",
        "exposure_bias",
        "settings",
        "definitions",
    } <= set(a)
    assert set(a["exaccerr"]) == {"2", "4", "8"}
    assert a["reverse_kl"] > 0 and a["forward_kl"] > 0 and 0 <= a["ece"] <= 1 and 0 <= a["distinct_4"] <= 1
    assert a["settings"]["max_new_tokens"] == 8  # raised to max(--lengths)
    assert a["n_examples"] == 2 and a["samples"]["n_samples"] == 4 and a["exposure_bias"]["seeds"] == [10, 20]
    assert {"reverse_kl", "forward_kl", "n_tokens"} <= set(a["reference"])
    assert {"ece", "accuracy", "mean_confidence", "bins"} <= set(a["calibration"])
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"seed", "prompt", "generation", "length"} <= set(rows[0])
    assert not list(out.glob(".*.tmp"))
    assert "ExAccErr(8)" in proc.stdout


def load_cli():
    spec = importlib.util.spec_from_file_location("analyze_cli", REPO / "eval" / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_analyze_cli_user_errors_exit_2(tmp_path, tiny_dir, capsys):
    cli = load_cli()
    data = write_data(tmp_path / "d.jsonl")
    base = ["--model", str(tiny_dir), "--teacher", str(tiny_dir), "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
    assert cli.main(base + ["--data", str(data), "--lengths", "0,4"]) == 2
    assert capsys.readouterr().err.startswith("error: --lengths")
    assert cli.main(base + ["--data", str(data), "--seeds", "x"]) == 2
    assert "--seeds" in capsys.readouterr().err
    code = cli.main(
        [
            "--model",
            str(tiny_dir),
            "--teacher",
            str(tmp_path / "nope"),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "nope" in capsys.readouterr().err

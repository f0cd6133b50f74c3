"""A catalogue of bad inputs. Every case runs the real entry point (``minidistill.run.main``, a few
through ``python -m minidistill.run``) and checks the contract of ``minidistill.errors.UserError``:

* exit code 2 and no traceback;
* exactly one ``error:`` line, the last thing printed, naming the file / key / field and what was
  expected (asserted on specific substrings);
* no partial output: for every problem found before the first stage starts (recipe, models,
  data files, stores, output_dir) ``output_dir`` is exactly as it was (absent stays absent).
  A problem found mid-pipeline (in data a stage produced) leaves the complete outputs of the
  stages before it and nothing of the failing stage (see ``minidistill/run.py``).

Also: recipes are read with ``yaml.safe_load``, model code from a folder never runs unless the
recipe asks, and checkpoint ``.pt`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minidistill.config import dump_yaml, load_recipe
from minidistill.run import main

pytestmark = pytest.mark.e2e  # end to end: `./test.sh -m 'not slow and not e2e'` skips it

ROOT = Path(__file__).resolve().parents[2]
SFT1 = [{"type": "sft", "name": "sft", "max_steps": 1, "batch_size": 2, "eval_every": 0, "keep_best": False}]
PD1 = [{"type": "pd", "name": "pd", "max_steps": 1, "batch_size": 2, "eval_at_start": False}]
MINILLM = {"type": "minillm", "name": "minillm", "max_steps": 1, "num_rollouts": 2, "batch_size": 2, "lm_coef": 0.0}


# ---------------------------------------------------------------- helpers


def snapshot(path: Path) -> dict | None:
    """Every file under ``path`` with its size and mtime (None when absent): 'unchanged' means equal."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return {".": (path.stat().st_size, path.stat().st_mtime_ns)}
    return {
        str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else "dir"
        for f in sorted(path.rglob("*"))
    }


def error_line(code: int, err: str, *needles: str, alone: bool = False) -> str:
    """Assert the UserError contract on one run's exit code and stderr; returns the error line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # one line, nothing after it
    if alone:  # found before any model loads: nothing else was printed
        assert lines == errors, err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def fails(capsys, argv: list, *needles: str, out: Path, alone: bool = False) -> str:
    """Run main(argv): exit 2 with one error line holding ``needles``; ``out`` unchanged."""
    before = snapshot(out)
    code = main([str(a) for a in argv])
    line = error_line(code, capsys.readouterr().err, *needles, alone=alone)
    assert snapshot(out) == before, f"{out} changed"
    return line


def cli(argv: list) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "minidistill.run", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def write_jsonl_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- the recipe itself (no model loads)


RECIPE_CASES = [
    # id, stages, overrides, needles
    ("unknown-top-key", SFT1, ["outptu_dir=x"], ["outptu_dir: unknown key", "did you mean 'output_dir'"]),
    ("unknown-stage-key", [{**SFT1[0], "lrr": 1.0}], [], ["stages[0] (sft).lrr: unknown key", "did you mean 'lr'"]),
    ("unknown-nested-key", SFT1, ["student.lora.rank=4"], ["student.lora.rank: unknown key", "did you mean 'r'"]),
    ("string-for-int", SFT1, ["seed=abc"], ["seed: expected an integer, got 'abc'"]),
    ("list-for-float", SFT1, ["stages.sft.lr=[1, 2]"], ["(sft).lr: expected a number, got [1, 2]"]),
    ("string-for-bool", SFT1, ["overwrite=maybe"], ["overwrite: expected true/false, got 'maybe'"]),
    ("mapping-for-list", SFT1, ["data.corpus={a: 1}"], ["data.corpus: expected a list of a string"]),
    (
        "scalar-for-list",
        SFT1,
        ["student.keep_layers=3"],
        ["student.keep_layers: expected a list of an integer or null, got 3"],
    ),
    (
        "bad-stage-choice",
        SFT1,
        ["stages.0.scheduler=step"],
        ["(sft).scheduler: expected one of 'constant', 'cosine'", "got 'step'"],
    ),
    ("bad-choice", SFT1, ["precision=fp8"], ["precision: expected one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'"]),
    ("negative-lr", SFT1, ["stages.sft.lr=-0.001"], ["(sft).lr: expected a value >= 0.0, got -0.001"]),
    ("batch-size-0", SFT1, ["stages.sft.batch_size=0"], ["(sft).batch_size: expected a value >= 1, got 0"]),
    (
        "mix-alpha-above-1",
        [MINILLM],
        ["stages.minillm.mix_alpha=1.5"],
        ["(minillm).mix_alpha: expected a value <= 1.0, got 1.5"],
    ),
    (
        "mix-alpha-negative",
        [MINILLM],
        ["stages.minillm.mix_alpha=-0.2"],
        ["(minillm).mix_alpha: expected a value >= 0.0, got -0.2"],
    ),
    ("top-p-zero", PD1, ["stages.pd.top_p=0"], ["(pd).top_p: expected a value > 0.0, got 0.0"]),
    ("top-p-above-1", [MINILLM], ["stages.minillm.top_p=1.5"], ["(minillm).top_p: expected a value <= 1.0, got 1.5"]),
    ("top-k-negative", [MINILLM], ["stages.minillm.top_k=-1"], ["(minillm).top_k: expected a value >= 0, got -1"]),
    ("temperature-zero", PD1, ["stages.pd.temperature=0"], ["(pd).temperature: expected a value > 0.0, got 0.0"]),
    (
        "sampling-temperature-zero",
        [MINILLM],
        ["stages.minillm.temperature=0"],
        ["(minillm).temperature: expected a value > 0.0"],
    ),
    (
        "unknown-stage-type",
        [{"type": "sfft"}],
        [],
        ["stages[0].type: unknown stage type 'sfft'", "did you mean 'sft'", "expected one of sft, kd"],
    ),
    ("stage-without-type", [{"name": "x"}], [], ["stages[0].type: unknown stage type None", "expected one of"]),
    ("stage-not-a-mapping", ["sft"], [], ["stages[0]: expected a mapping with a 'type'"]),
    ("duplicate-stage-names", [SFT1[0], SFT1[0]], [], ["stages[1].name: duplicate stage name 'sft'"]),
    ("empty-stages", [], [], ["stages: expected a non-empty list of stages"]),
    ("override-without-equals", SFT1, ["seed"], ["override 'seed': expected dotted.key=value"]),
    (
        "override-unknown-stage",
        SFT1,
        ["stages.nope.lr=1"],
        ["override 'stages.nope.lr': no stage named 'nope' (stages: sft)"],
    ),
    ("override-into-scalar", SFT1, ["seed.x=1"], ["override 'seed.x=1': 'seed' is not a mapping"]),
    ("override-unknown-key", SFT1, ["stages.sft.learning_rate=1"], ["(sft).learning_rate: unknown key"]),
    (
        "layer-stride-zero",
        SFT1,
        ["student.keep_layers=null", "student.layer_stride=0"],
        ["student.layer_stride: expected a value >= 1, got 0"],
    ),
    (
        "layer-stride-negative",
        SFT1,
        ["student.keep_layers=null", "student.layer_stride=-2"],
        ["student.layer_stride: expected a value >= 1, got -2"],
    ),
    (
        "prune-without-layers",
        SFT1,
        ["student.keep_layers=null"],
        ["student: init 'prune' needs keep_layers or layer_stride"],
    ),
    (
        "max-length-below-prompt",
        SFT1,
        ["data.max_length=100", "data.max_prompt_length=200"],
        ["data.max_prompt_length: must be < data.max_length (100)"],
    ),
    ("no-output-dir", SFT1, ["output_dir="], ["output_dir: required"]),
    ("no-teacher", SFT1, ["teacher.model="], ["teacher.model: required"]),
    (
        "pretrained-without-model",
        SFT1,
        ["student.init=pretrained"],
        ["student.model: required when student.init is 'pretrained'"],
    ),
    ("lora-rank-zero", SFT1, ["student.lora.r=0"], ["student.lora.r: expected a value >= 1, got 0"]),
    (
        "offline-pd-without-store",
        [{**PD1[0], "teacher_logits": "offline"}],
        [],
        ["(pd).store: teacher_logits 'offline' needs a logit store", "pd_store stage before"],
    ),
]


@pytest.mark.parametrize("stages,overrides,needles", [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe(recipe_file, capsys, stages, overrides, needles):
    path = recipe_file(stages)
    line = fails(capsys, [path, *overrides], *needles, out=path.parent / "run", alone=True)
    assert "recipe.yaml" in line or "override" in line  # names the file (or the override it comes from)


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("output_dir: out\nseed: 1\nstages: [{type: sft\nteacher: {model: x}\n")
    line = fails(capsys, [p], f"{p}:4:", "YAML syntax error", out=tmp_path / "out", alone=True)
    assert "expected ',' or '}'" in line


def test_unknown_key_cli(recipe_file):
    """Through the real CLI: exit status 2, exactly one stderr line, nothing written."""
    path = recipe_file([{**SFT1[0], "lrr": 1}])
    proc = cli([path])
    error_line(
        proc.returncode, proc.stderr, "recipe.yaml: stages[0] (sft).lrr: unknown key", "did you mean 'lr'", alone=True
    )
    assert not (path.parent / "run").exists()


def test_recipe_not_utf8(tmp_path, capsys):
    p = tmp_path / "binary.yaml"
    p.write_bytes(b"output_dir: x\n\xff\xfe\x00\x01")
    fails(capsys, [p], "binary.yaml: not UTF-8 text", "expected a YAML recipe", out=tmp_path / "x", alone=True)


def test_recipe_file_missing(tmp_path, capsys):
    fails(capsys, [tmp_path / "nope.yaml"], "nope.yaml: recipe file not found", out=tmp_path, alone=True)


def test_recipe_not_a_mapping(tmp_path, capsys):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    fails(capsys, [p], "list.yaml: expected a mapping of recipe keys at the top level", out=tmp_path, alone=True)


def test_python_yaml_tag_is_refused_not_run(tmp_path):
    """yaml.safe_load: a !!python tag is an error (through the real CLI), and its code never runs."""
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        f"seed: !!python/object/apply:os.mkdir [{str(marker)!r}]\n"
        "teacher: {model: x}\nstages: [{type: sft}]\n"
    )
    proc = cli([p])
    line = error_line(proc.returncode, proc.stderr, f"{p}:2:", "!!python/object/apply:os.mkdir", "plain YAML")
    assert "tag" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- models


def test_missing_teacher_folder(recipe_file, tmp_path, capsys):
    fails(
        capsys,
        [recipe_file(SFT1), f"teacher.model={tmp_path / 'no_such_model'}"],
        "teacher.model: model",
        "no_such_model': no such folder",
        "expected a local model folder",
        out=tmp_path / "run",
        alone=True,
    )


def test_teacher_folder_without_config(recipe_file, tmp_path, capsys):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    fails(
        capsys,
        [recipe_file(SFT1), f"teacher.model={empty}"],
        "teacher.model",
        "empty_model",
        "cannot load",
        out=tmp_path / "run",
    )


def test_gguf_file_absent(recipe_file, tmp_path, capsys):
    fails(
        capsys,
        [recipe_file(SFT1), f"teacher.model={tmp_path / 'absent.gguf'}"],
        "teacher.model",
        "absent.gguf",
        "file not found",
        out=tmp_path / "run",
        alone=True,
    )


def test_gguf_file_corrupt(recipe_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(300))
    fails(
        capsys,
        [recipe_file(SFT1), f"teacher.model={bad}"],
        "teacher.model",
        "garbage.gguf",
        "cannot load as GGUF",
        out=tmp_path / "run",
    )
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # no half-built cache entry


def test_corrupt_weights_file(recipe_file, tmp_path, tiny_dir, capsys):
    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    fails(
        capsys,
        [recipe_file(SFT1), f"teacher.model={broken}"],
        "teacher.model",
        "broken_model",
        "cannot load",
        out=tmp_path / "run",
    )


def _student_folder(tmp_path: Path, name: str, *, tokenizer, vocab_size: int | None = None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    out = tmp_path / name
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_student_with_a_different_vocabulary(recipe_file, tmp_path, capsys):
    """A pretrained student whose tokenizer has another vocabulary (here: 100 extra tokens)."""
    from tiny_tokenizer import make_tokenizer

    tok = make_tokenizer()
    tok.add_tokens([f"<extra_{i}>" for i in range(100)])
    student = _student_folder(tmp_path, "other_vocab", tokenizer=tok)
    fails(
        capsys,
        [recipe_file(SFT1), "student.init=pretrained", f"student.model={student}", "student.keep_layers=null"],
        "student.model",
        "tokenizer differs from the teacher's (359 vs 259 tokens)",
        "same tokenizer",
        out=tmp_path / "run",
    )


def test_student_with_a_different_tokenizer_same_size(recipe_file, tmp_path, capsys):
    """Same number of tokens, different token -> id mapping: still refused."""
    from tiny_tokenizer import make_tokenizer

    tok = make_tokenizer()
    vocab = tok.backend_tokenizer.to_str()
    data = json.loads(vocab)
    v = data["model"]["vocab"]
    a, b = "A", "B"
    v[a], v[b] = v[b], v[a]  # swap two byte symbols
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    swapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token=tok.eos_token,
        bos_token=tok.bos_token,
        pad_token=tok.pad_token,
    )
    student = _student_folder(tmp_path, "swapped_vocab", tokenizer=swapped)
    fails(
        capsys,
        [recipe_file(SFT1), "student.init=pretrained", f"student.model={student}", "student.keep_layers=null"],
        "student.model",
        "tokenizer differs from the teacher's (259 vs 259 tokens)",
        out=tmp_path / "run",
    )


def test_student_head_smaller_than_the_tokenizer(recipe_file, tmp_path, capsys):
    from tiny_tokenizer import make_tokenizer

    student = _student_folder(tmp_path, "small_head", tokenizer=make_tokenizer(), vocab_size=200)
    fails(
        capsys,
        [recipe_file(SFT1), "student.init=pretrained", f"student.model={student}", "student.keep_layers=null"],
        "student: vocabulary mismatch: tokenizer has 259 tokens",
        "student head 200 rows",
        out=tmp_path / "run",
    )


@pytest.mark.parametrize("keep,needle", [("[0, 9]", "[0, 9]"), ("[-1, 2]", "[-1, 2]"), ("[1, 1]", "[1, 1]")])
def test_keep_layers_out_of_range(recipe_file, tmp_path, capsys, keep, needle):
    fails(
        capsys,
        [recipe_file(SFT1), f"student.keep_layers={keep}"],
        "student.keep_layers: expected distinct layer indices in [0, 3]",
        needle,
        out=tmp_path / "run",
    )


def test_config_override_not_a_model_field(recipe_file, tmp_path, capsys):
    fails(
        capsys,
        [
            recipe_file(SFT1),
            "student.init=config",
            "student.keep_layers=null",
            "student.config_overrides={n_layerz: 1}",
        ],
        "student.config_overrides.n_layerz: not a field of LlamaConfig",
        out=tmp_path / "run",
    )


def test_lora_target_module_not_in_model(recipe_file, tmp_path, capsys):
    fails(
        capsys,
        [recipe_file(SFT1), "student.lora.enabled=true", "student.lora.target_modules=[q_proj, c_attn]"],
        "student.lora.target_modules: ['c_attn'] not found in the model",
        "q_proj",
        out=tmp_path / "run",
    )


def _custom_code_model(tmp_path: Path, tiny_dir: Path, marker: Path, *, known_type: bool) -> Path:
    """The tiny teacher with an auto_map to a Python file that, if ever imported, creates ``marker``."""
    folder = tmp_path / ("custom_known" if known_type else "custom_only")
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    if not known_type:
        cfg["model_type"] = "evil_llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    return folder


def test_custom_model_code_needs_trust_remote_code(recipe_file, tmp_path, tiny_dir, capsys):
    """A folder that only loads with its own Python code: refused (the code never runs) unless the recipe opts in."""
    marker = tmp_path / "code_ran"
    folder = _custom_code_model(tmp_path, tiny_dir, marker, known_type=False)
    fails(
        capsys,
        [recipe_file(SFT1), f"teacher.model={folder}"],
        "teacher.model",
        "custom model code",
        "set trust_remote_code: true",
        out=tmp_path / "run",
    )
    assert not marker.exists()


def test_models_load_without_remote_code_by_default(tmp_path, tiny_dir, recipe_file):
    from minidistill import models

    r = load_recipe(recipe_file(SFT1))
    assert r.teacher.trust_remote_code is False and r.student.trust_remote_code is False
    marker = tmp_path / "code_ran"
    folder = _custom_code_model(tmp_path, tiny_dir, marker, known_type=True)
    model, tok = models.load_model(str(folder))  # a built-in architecture: auto_map ignored
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()
    model = models.load_model(str(folder), with_tokenizer=False, trust_remote_code=True)  # opting in runs it
    assert type(model).__name__ == "EvilModel" and marker.exists()


# ---------------------------------------------------------------- instruction data


GOOD = json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."})
DATA_CASES = [
    # id, train lines (None: file absent), extra overrides, needles
    ("missing-file", None, [], ["data.train: ", "bad_train.jsonl: file not found"]),
    (
        "not-json",
        [GOOD, GOOD, "{instruction: oops"],
        [],
        ["data.train: ", "bad_train.jsonl:3: not valid JSON", "column 2"],
    ),
    (
        "not-an-object",
        [GOOD, "[1, 2, 3]"],
        [],
        ["data.train: ", "bad_train.jsonl:2: expected a JSON object (a record), got a list"],
    ),
    (
        "no-instruction",
        [GOOD, json.dumps({"question": "x", "output": "y"})],
        [],
        ["data.train: ", "bad_train.jsonl:2: record has no 'instruction' field"],
    ),
    (
        "no-output",
        [json.dumps({"instruction": "x"}), GOOD],
        [],
        ["data.train: ", "bad_train.jsonl:1: record has no 'output' or 'response' field"],
    ),
    (
        "output-not-string",
        [GOOD, json.dumps({"instruction": "x", "output": 5})],
        [],
        ["data.train: ", "bad_train.jsonl:2: field 'output' must be a string"],
    ),
    ("empty-file", ["", "  "], [], ["data.train: ", "bad_train.jsonl: no instruction records found"]),
    ("not-utf8", b'{"instruction": "\xff\xfe"}\n', [], ["data.train: ", "bad_train.jsonl:1: not UTF-8 text"]),
    (
        "held-out-everything",
        [GOOD] * 3,
        ["data.valid=null", "data.valid_size=3"],
        ["data.valid_size: holding out 3 examples leaves no training examples", "bad_train.jsonl has 3"],
    ),
    (
        "all-prompts-too-long",
        [GOOD] * 3,
        ["data.max_prompt_length=20", "data.max_length=40"],
        ["bad_train.jsonl: all 3 examples dropped: prompts longer than max_prompt_length=20 tokens"],
    ),
]


@pytest.mark.parametrize("lines,overrides,needles", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_instruction_data(recipe_file, tmp_path, capsys, lines, overrides, needles):
    train = tmp_path / "bad_train.jsonl"
    if isinstance(lines, bytes):
        train.write_bytes(lines)
    elif lines is not None:
        write_jsonl_lines(train, lines)
    fails(capsys, [recipe_file(SFT1), f"data.train={train}", *overrides], *needles, out=tmp_path / "run")


def test_chat_template_missing(recipe_file, tmp_path, tiny_dir, capsys):
    folder = tmp_path / "no_chat"  # a teacher whose tokenizer has no chat template
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in folder.glob("chat_template.*"):
        f.unlink()
    fails(
        capsys,
        [recipe_file(SFT1), "data.template=chat", f"teacher.model={folder}"],
        "no_chat: tokenizer has no chat_template",
        "use template 'alpaca'",
        out=tmp_path / "run",
    )


def test_bad_validation_file(recipe_file, tmp_path, capsys):
    valid = write_jsonl_lines(tmp_path / "bad_valid.jsonl", [GOOD, "not json"])
    fails(
        capsys,
        [recipe_file(SFT1), f"data.valid={valid}"],
        "data.valid: ",
        "bad_valid.jsonl:2: not valid JSON",
        out=tmp_path / "run",
    )


def test_instruction_data_unset_for_sft(recipe_file, tmp_path, capsys):
    fails(
        capsys,
        [recipe_file(SFT1), "data.train=null", "data.valid=null"],
        "data.train: required by this stage",
        out=tmp_path / "run",
    )


# ---------------------------------------------------------------- corpus


def test_corpus_file_missing(recipe_file, tmp_path, capsys):
    fails(
        capsys,
        [recipe_file(PD1), f"data.corpus=[{tmp_path / 'nope.txt'}]"],
        "data.corpus: ",
        "nope.txt: file not found",
        out=tmp_path / "run",
    )


def test_corpus_empty_file(recipe_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    fails(
        capsys,
        [recipe_file(PD1), f"data.corpus=[{empty}]"],
        "data.corpus: ",
        "empty.txt: no text found",
        out=tmp_path / "run",
    )


def test_corpus_shorter_than_one_block(recipe_file, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    fails(
        capsys,
        [recipe_file(PD1), f"data.corpus=[{short}]"],
        "data.corpus: ",
        "short.txt: corpus has 17 tokens, fewer than one block of block_len=32",
        out=tmp_path / "run",
    )


def test_corpus_jsonl_without_text(recipe_file, tmp_path, capsys):
    bad = write_jsonl_lines(tmp_path / "docs.jsonl", [json.dumps({"text": "hello"}), json.dumps({"body": "x"})])
    fails(
        capsys,
        [recipe_file(PD1), f"data.corpus=[{bad}]"],
        "data.corpus: ",
        "docs.jsonl:2: record has no 'text' field",
        out=tmp_path / "run",
    )


def test_corpus_all_held_out(recipe_file, tmp_path, capsys):
    fails(
        capsys,
        [recipe_file(PD1), "data.valid_blocks=500"],
        "data.valid_blocks: 500 held-out blocks leave no training text",
        out=tmp_path / "run",
    )


def test_pd_without_corpus(recipe_file, tmp_path, capsys):
    fails(
        capsys, [recipe_file(PD1), "data.corpus=[]"], "data.corpus: this stage needs plain text", out=tmp_path / "run"
    )


# ---------------------------------------------------------------- offline logit stores


@pytest.fixture(scope="module")
def store_setup(tmp_path_factory, tiny_dir):
    """One small pd_store build (4 blocks of 32 tokens) shared by the store cases."""
    from tiny_assets import tiny_recipe

    base = tmp_path_factory.mktemp("store")
    corpus = base / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: the cat sat on the mat, again and again." for i in range(40)))
    data = {"train": None, "valid": None, "corpus": str(corpus)}
    recipe = tiny_recipe(base, tiny_dir, data, [{"type": "pd_store", "name": "logits", "top_k": 4}], threads=1)
    recipe["data"].update({"max_blocks": 4, "valid_blocks": 2, "train": None, "valid": None})
    path = base / "build.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path)]) == 0
    recipe["stages"] = [{**PD1[0], "teacher_logits": "offline", "top_k": 4, "store": "STORE"}]
    recipe.pop("output_dir")
    return base / "run" / "logits", recipe


def _store_case(tmp_path: Path, store_setup, tamper) -> Path:
    store, recipe = store_setup
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    tamper(copy)
    recipe = json.loads(json.dumps(recipe).replace("STORE", str(copy)))
    recipe["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _edit_header(**changes):
    def tamper(folder: Path) -> None:
        h = json.loads((folder / "header.json").read_text())
        h.update(changes)
        (folder / "header.json").write_text(json.dumps(h))

    return tamper


def test_store_from_another_tokenizer(tmp_path, store_setup, capsys):
    path = _store_case(tmp_path, store_setup, _edit_header(tokenizer_hash="0123456789abcdef"))
    fails(
        capsys,
        [path],
        "stages.pd.store: ",
        "store: logit store tokenizer_hash is '0123456789abcdef' but this run has",
        "rebuild the store",
        out=tmp_path / "run",
    )


def test_store_for_another_block_length(tmp_path, store_setup, capsys):
    path = _store_case(tmp_path, store_setup, lambda f: None)
    fails(
        capsys,
        [path, "data.block_len=16"],
        "stages.pd.store: ",
        "logit store block_len is 32 but this run has 16",
        out=tmp_path / "run",
    )


def test_store_with_other_top_k(tmp_path, store_setup, capsys):
    path = _store_case(tmp_path, store_setup, lambda f: None)
    fails(
        capsys,
        [path, "stages.pd.top_k=8"],
        "stages.pd.store: ",
        "logit store top_k is 4 but this run has 8",
        out=tmp_path / "run",
    )


def test_store_with_corrupt_header(tmp_path, store_setup, capsys):
    path = _store_case(tmp_path, store_setup, lambda f: (f / "header.json").write_bytes(os.urandom(200)))
    fails(capsys, [path], "stages.pd.store: ", "header.json", "unreadable", "rebuild the store", out=tmp_path / "run")


def test_store_header_missing_fields(tmp_path, store_setup, capsys):
    def tamper(folder: Path) -> None:
        h = json.loads((folder / "header.json").read_text())
        del h["shards"]
        (folder / "header.json").write_text(json.dumps(h))

    path = _store_case(tmp_path, store_setup, tamper)
    fails(capsys, [path], "stages.pd.store: ", "header.json", "'shards'", out=tmp_path / "run")


def test_store_truncated_shard(tmp_path, store_setup, capsys):
    def tamper(folder: Path) -> None:
        f = next(folder.glob("shard_*.logprobs.npy"))
        f.write_bytes(f.read_bytes()[:100])

    path = _store_case(tmp_path, store_setup, tamper)
    fails(
        capsys,
        [path],
        "stages.pd.store: ",
        "logprobs.npy: logit store shard file missing or truncated",
        out=tmp_path / "run",
    )


def test_store_folder_missing(tmp_path, store_setup, capsys):
    path = _store_case(tmp_path, store_setup, lambda f: shutil.rmtree(f))
    fails(capsys, [path], "stages.pd.store: ", "logit store folder not found", out=tmp_path / "run")


def test_store_settings_differ_from_the_recipes_pd_store(recipe_file, tmp_path, capsys):
    """pd_store and the pd stage reading it disagree on top_k: refused before the store is built."""
    stages = [{"type": "pd_store", "name": "logits", "top_k": 4}, {**PD1[0], "teacher_logits": "offline", "top_k": 8}]
    fails(
        capsys,
        [recipe_file(stages)],
        "(pd).top_k: 8 differs from stage 'logits' (top_k 4)",
        out=tmp_path / "run",
        alone=True,
    )


# ---------------------------------------------------------------- output_dir


def test_output_dir_is_a_file(recipe_file, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me")
    fails(capsys, [recipe_file(SFT1), f"output_dir={f}"], "output_dir", "afile", "exists and is not a folder", out=f)
    assert f.read_text() == "keep me"


def test_output_dir_inside_a_file(recipe_file, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me")
    fails(capsys, [recipe_file(SFT1), f"output_dir={f / 'run'}"], "output_dir", "is not a folder", out=f)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_dir_not_writable(recipe_file, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        fails(
            capsys,
            [recipe_file(SFT1), f"output_dir={locked / 'run'}"],
            "output_dir",
            "locked",
            "not writable",
            out=locked,
            alone=True,
        )
    finally:
        locked.chmod(0o700)


def test_output_dir_not_writable_message(recipe_file, tmp_path, capsys, monkeypatch):
    """The same refusal where permissions cannot be tested for real (root): the access check says no."""
    import minidistill.pipeline.outputs as outputs_mod

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(
        outputs_mod.os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw)
    )
    fails(
        capsys,
        [recipe_file(SFT1), f"output_dir={locked / 'run'}"],
        "output_dir",
        "not writable",
        "no write permission on",
        out=locked,
        alone=True,
    )


def test_tensorboard_run_with_bad_data_writes_nothing(recipe_file, tmp_path, capsys):
    fails(
        capsys,
        [recipe_file(SFT1), "tensorboard=true", f"data.train={tmp_path / 'missing.jsonl'}"],
        "data.train: ",
        "missing.jsonl: file not found",
        out=tmp_path / "run",
    )


def _fake_run(out: Path, recipe: Path, overrides: list[str]) -> None:
    """An output_dir holding a finished-looking run of ``recipe`` + ``overrides``."""
    out.mkdir()
    (out / "recipe.yaml").write_text(dump_yaml(load_recipe(recipe, overrides)))
    (out / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')


def test_output_dir_holds_another_recipes_run(recipe_file, tmp_path, capsys):
    path = recipe_file(SFT1)
    out = tmp_path / "run"
    _fake_run(out, path, ["seed=7"])
    fails(capsys, [path], "output_dir", "already holds a run", "resume=auto", "overwrite=true", out=out, alone=True)
    fails(capsys, [path, "resume=auto"], "holds a run of a different recipe", "overwrite=true", out=out, alone=True)


def test_output_dir_with_unrelated_files(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails(capsys, [recipe_file(SFT1)], "output_dir", "not empty", "no recipe.yaml", out=out, alone=True)
    fails(capsys, [recipe_file(SFT1), "resume=auto"], "no recipe.yaml", out=out, alone=True)


def test_bad_data_does_not_clear_an_overwrite_target(recipe_file, tmp_path, capsys):
    """overwrite=true deletes the old run only once the new one has passed every check."""
    path = recipe_file(SFT1)
    out = tmp_path / "run"
    _fake_run(out, path, ["seed=7"])
    fails(
        capsys,
        [path, "overwrite=true", f"data.train={tmp_path / 'missing.jsonl'}"],
        "missing.jsonl: file not found",
        out=out,
    )


def test_resume_auto_without_checkpoint_starts_fresh(recipe_file, tmp_path, capsys):
    """Not an error: resume=auto on an empty output_dir starts from scratch and says so."""
    from minidistill.reporting.tracking import read_metrics

    path = recipe_file(SFT1, resume="auto")
    assert main([str(path)]) == 0
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "resume=auto: no earlier run in" in err and "starting from scratch" in err
    out = tmp_path / "run"
    assert (out / "sft" / "final" / "config.json").is_file()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1]


# ---------------------------------------------------------------- mid-pipeline: data a stage produced


def test_error_mid_pipeline_keeps_finished_stages_only(recipe_file, tmp_path, capsys):
    """The generate stage's corpus turns out shorter than one block when PD packs it: the run stops
    with exit 2; the earlier stage's final/ is complete, the failing stage wrote nothing."""
    stages = [
        SFT1[0],
        {
            "type": "generate",
            "name": "gen",
            "splits": ["train"],
            "corpus": True,
            "max_new_tokens": 2,
            "gen_batch_size": 24,
        },
        PD1[0],
    ]
    path = recipe_file(stages, threads=1)
    out = tmp_path / "run"
    code = main([str(path), "data.block_len=100000"])
    error_line(
        code,
        capsys.readouterr().err,
        "stage 'gen' generated text: corpus has",
        "fewer than one block of block_len=100000",
    )
    from minidistill.training import checkpoint as ckpt

    assert ckpt.is_complete(out / "sft" / "final")[0]
    assert not (out / "pd").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]


# ---------------------------------------------------------------- checkpoints are not pickles


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_checkpoint_pickle_is_refused(tmp_path, tiny_dir):
    """A checkpoint's .pt file holding a pickled object that runs code on load: refused, never run."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from minidistill.training import checkpoint as ckpt

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder = ckpt.save_checkpoint(
        acc, tmp_path / "checkpoints", 1, model, opt, sched, {"pos": 0}, {"step": 1}, keep_last=2
    )
    marker = tmp_path / "code_ran"
    with open(folder / "optimizer.pt", "wb") as f:
        pickle.dump({"state": _Payload(marker)}, f, protocol=2)
    torch.save({"state": {}}, folder / "scheduler.pt")  # a valid file stays loadable
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        ckpt.load_checkpoint(acc, folder, model, opt, sched)
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    """No ``torch.load`` in the package may unpickle arbitrary objects."""
    import re

    calls = []
    for f in sorted((ROOT / "minidistill").rglob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((f.name, text[m.start() : i]))
    assert calls, "expected checkpoint loading to use torch.load"
    assert all("weights_only=True" in c for _, c in calls), [c for c in calls if "weights_only=True" not in c[1]]

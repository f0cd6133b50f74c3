"""eval/compare.py: the comparison experiment end to end on the tiny teacher (every method,
including TRL's DistillationTrainer), plus its recipes and its error paths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "eval"))

import compare  # noqa: E402

from minidistill.config import load_recipe  # noqa: E402

pytestmark = pytest.mark.e2e  # end to end: `./test.sh -m 'not slow and not e2e'` skips it


def test_compare_recipes_parse():
    for name in ("start", "sft", "kd", "seqkd", "minillm"):
        recipe = load_recipe(ROOT / "recipes" / "compare" / f"{name}.yaml")
        assert recipe.stages
    start = load_recipe(ROOT / "recipes" / "compare" / "start.yaml")
    assert start.student.init == "prune" and start.stages[0].type == "pd"
    for name in ("sft", "kd", "seqkd", "minillm"):
        r = load_recipe(ROOT / "recipes" / "compare" / f"{name}.yaml")
        # every method starts from the shared start's final/ folder
        assert r.student.init == "pretrained" and r.student.model == "runs/compare/start/pd/final"


def test_ci95():
    mean, half = compare.ci95([10.0, 12.0, 14.0])
    assert mean == pytest.approx(12.0)
    assert half == pytest.approx(4.303 * 2.0 / 3**0.5, rel=1e-4)
    assert compare.ci95([5.0]) == (5.0, None)


def test_missing_shared_data_is_a_clean_error(tmp_path, capsys):
    code = compare.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "dolly_dev.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_method(tmp_path, capsys):
    assert compare.main(["--methods", "sft,bogus", "--out", str(tmp_path / "out")]) == 2
    assert "bogus" in capsys.readouterr().err


def test_compare_end_to_end_tiny(tmp_path, sharp_dir, tiny_data, capsys):
    pytest.importorskip("trl")
    out = tmp_path / "cmp"
    argv = [
        "--tiny",
        "--teacher",
        str(sharp_dir),
        "--train",
        tiny_data["train"],
        "--test",
        f"a={tiny_data['valid']}",
        "--test",
        f"b={tiny_data['valid']}",
        "--corpus",
        tiny_data["corpus"],
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--start-steps",
        "2",
        "--layer-stride",
        "3",
        "--seeds",
        "10,20",
        "--max-examples",
        "3",
        "--max-new-tokens",
        "6",
        "--gen-tokens",
        "6",
        "--eval-batch-size",
        "4",
        "--eval-dtype",
        "fp32",
        "--precision",
        "fp32",
        "--threads",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert compare.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    names = ["teacher", "start", "sft", "kd", "seqkd", "minillm", "trl"]
    assert list(results["models"]) == names
    # the valid items are also in the training file's source: they must have been dropped from training
    assert results["train_data"]["n_dropped_test_overlap"] == 12
    train_rows = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(train_rows) == 4
    for name in names:
        for ds in ("a", "b"):
            m = results["models"][name][ds]
            assert set(m["rougeL_per_seed"]) == {"10", "20"}
            assert m["n_examples"] == 3
            assert 0.0 <= m["rougeL"] <= 100.0 and m["rougeL_ci95"] is not None
            assert (m["reverse_kl_gold"] is None) == (name == "teacher")
            if name != "teacher":  # a student with 2 of the teacher's 4 layers is not the teacher
                assert m["reverse_kl_own_samples"] > 0 and m["forward_kl_teacher_samples"] > 0
                assert m["reverse_kl_gold"] > 0 and m["forward_kl_gold"] > 0
    # every method trained from the shared start, for the same number of optimizer steps
    for name in ("sft", "kd", "seqkd", "minillm"):
        saved = (out / name / "recipe.yaml").read_text()
        assert str(out / "start" / "pd" / "final") in saved and "max_steps: 2" in saved
    history = json.loads((out / "trl" / "log_history.json").read_text())
    assert max(h.get("step", 0) for h in history) == 2
    start_w = _weights(out / "start" / "pd" / "final")
    for name in ("sft", "kd", "seqkd", "minillm", "trl"):
        final = Path(results["training"][name]["final"])
        assert _weights(final).keys() == start_w.keys()
        assert any(not _close(_weights(final)[k], start_w[k]) for k in start_w), f"{name} did not change the start"
    table = (out / "table.md").read_text()
    for name in names:
        assert f"| {name} |" in table

    # a rerun with the same settings reuses every trained model and evaluation
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    assert compare.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == mtimes
    again = json.loads((out / "results.json").read_text())
    assert again["models"] == results["models"]
    assert all(again["training"][m]["reused"] for m in ("sft", "kd", "seqkd", "minillm", "trl"))
    assert again["training"]["sft"]["seconds"] == results["training"]["sft"]["seconds"]

    # another budget in the same folder is refused (one line), not mixed with the old run
    steps = argv.index("--steps") + 1
    changed = argv[:steps] + ["3"] + argv[steps + 1 :] + ["--methods", "sft"]
    assert compare.main(changed) == 2
    assert "--overwrite" in capsys.readouterr().err


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _close(a, b) -> bool:
    import torch

    return torch.allclose(a.float(), b.float())

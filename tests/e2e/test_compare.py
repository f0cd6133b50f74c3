"""eval/compare.py: the comparison experiment end to end on the tiny teacher (every method,
including TRL's DistillationTrainer), plus its recipes and its error paths. The pure statistics
and the plan are unit-tested in tests/unit/test_comparison_stats.py."""

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
        "--minillm-steps",
        "3",
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
        "--exacc-lengths",
        "3,6",
        "--control-examples",
        "2",
        "--eval-start",
        "--out",
        str(out),
        "--publish",
        str(tmp_path / "docs"),
        "--no-progress",
    ]
    assert compare.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    main = ["teacher", "start", "sft", "kd", "seqkd", "minillm", "trl", "sft_long"]
    ablations = [
        "minillm_a0",
        "minillm_nolen",
        "minillm_nosingle",
        "minillm_const",
        "minillm_split",
        "minillm_long",
        "minillm_mask",
        "minillm_split_mask",
    ]
    names = main + ablations
    assert list(results["models"]) == names
    # the valid items are also in the training file's source: they must have been dropped from training
    assert results["train_data"]["n_dropped_test_overlap"] == 12
    train_rows = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(train_rows) == 4
    controls = ["sft_long", *ablations]
    for name in names:
        # the controls are scored on the first test set only (--control-tests default), 2 items
        assert list(results["models"][name]) == (["a"] if name in controls else ["a", "b"])
        for ds, m in results["models"][name].items():
            assert set(m["rougeL_per_seed"]) == {"10", "20"}
            assert m["n_examples"] == (2 if name in controls else 3)
            assert 0.0 <= m["rougeL"] <= 100.0 and m["rougeL_ci95"] is not None
            assert 0.0 <= m["eos_rate"] <= 1.0
            assert (m["reverse_kl_gold"] is None) == (name == "teacher")
            assert (m["exaccerr"] is None) == (name == "teacher")
            if name != "teacher":  # a student with 2 of the teacher's 4 layers is not the teacher
                assert m["reverse_kl_own_samples"] > 0 and m["forward_kl_teacher_samples"] > 0
                assert m["reverse_kl_gold"] > 0 and m["forward_kl_gold"] > 0
                assert set(m["exaccerr"]) == {"3", "6"}
            ci = results["rougeL_ci"][name][ds]
            assert ci["ci95"][0] <= ci["mean"] <= ci["ci95"][1]
            assert ci["mean"] == pytest.approx(m["rougeL"])  # same items, same seeds: the same mean
    # the paired differences: minillm minus every other model, every ablation minus minillm
    expected = {f"minillm - {n}" for n in main if n != "minillm"} | {f"{n} - minillm" for n in ablations}
    assert set(results["paired"]) == expected
    items = {n: json.loads((out / "eval" / n / "summary.json").read_text())["item_scores"] for n in names}
    for label, per_ds in results["paired"].items():
        first, second = label.split(" - ")
        for ds, d in per_ds.items():
            common = sorted(set(items[first][ds]) & set(items[second][ds]))
            assert d["n_items"] == len(common) == (2 if first in controls or second in controls else 3)
            gap = sum(sum(items[first][ds][i]) - sum(items[second][ds][i]) for i in common) / (2 * len(common))
            assert d["diff"] == pytest.approx(gap) and d["ci95"][0] <= d["diff"] <= d["ci95"][1]
            if len(common) == 3:  # every item: the paired mean is the difference of the two models' means
                gap = results["models"][first][ds]["rougeL"] - results["models"][second][ds]["rougeL"]
                assert d["diff"] == pytest.approx(gap)
    # sft, kd, seqkd train --steps from the shared start; minillm, trl and the ablations --minillm-steps from sft
    for name in ("sft", "kd", "seqkd"):
        saved = (out / name / "recipe.yaml").read_text()
        assert str(out / "start" / "pd" / "final") in saved and "max_steps: 2" in saved
    for name in ("minillm", "sft_long", *ablations):
        saved = (out / name / "recipe.yaml").read_text()
        assert str(out / "sft" / "sft" / "final") in saved and "max_steps: 3" in saved
        assert results["training"][name]["init"] == "sft" and results["training"][name]["steps"] == 3
    assert "mix_alpha: 0.0" in (out / "minillm_a0" / "recipe.yaml").read_text()
    assert "length_norm: false" in (out / "minillm_nolen" / "recipe.yaml").read_text()
    assert "single_step: false" in (out / "minillm_nosingle" / "recipe.yaml").read_text()
    assert "mix_alpha_end: 0.2" in (out / "minillm_const" / "recipe.yaml").read_text()
    assert "max_new_tokens: 12" in (out / "minillm_long" / "recipe.yaml").read_text()  # 2 x --gen-tokens 6
    assert "max_new_tokens: 6" in (out / "minillm" / "recipe.yaml").read_text()
    assert "student_rows: 0.5" in (out / "minillm_split" / "recipe.yaml").read_text()
    assert "mask_truncated: true" in (out / "minillm_mask" / "recipe.yaml").read_text()
    split_mask = (out / "minillm_split_mask" / "recipe.yaml").read_text()
    assert "mask_truncated: true" in split_mask and "student_rows: 0.5" in split_mask
    assert "mix_alpha: 0.2" in (out / "minillm" / "recipe.yaml").read_text()
    assert "type: sft" in (out / "sft_long" / "recipe.yaml").read_text()
    history = json.loads((out / "trl" / "log_history.json").read_text())
    assert max(h.get("step", 0) for h in history) == 3
    trl_settings = json.loads((out / "trl" / "settings.json").read_text())
    assert trl_settings["init"] == results["training"]["sft"]["final"]
    start_w = _weights(out / "start" / "pd" / "final")
    sft_w = _weights(out / "sft" / "sft" / "final")
    for name in ("sft", "kd", "seqkd", "minillm", "trl", "sft_long", *ablations):
        final = Path(results["training"][name]["final"])
        assert _weights(final).keys() == start_w.keys()
        base = sft_w if name not in ("sft", "kd", "seqkd") else start_w
        assert any(not _close(_weights(final)[k], base[k]) for k in base), f"{name} did not change its init"
    # --publish: the summaries (with per-item scores, no generations), results and table
    docs = tmp_path / "docs"
    assert json.loads((docs / "results.json").read_text())["paired"] == results["paired"]
    for name in names:
        summary = json.loads((docs / f"{name}.summary.json").read_text())
        assert set(summary["item_scores"]) == set(results["models"][name])
    assert not list(docs.rglob("*.generations.jsonl")) and not list(docs.rglob("*.safetensors"))
    table = (out / "table.md").read_text()
    for name in names:
        assert f"| {name} |" in table

    # a rerun with the same settings reuses every trained model and evaluation
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    assert compare.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == mtimes
    again = json.loads((out / "results.json").read_text())
    assert again["models"] == results["models"]
    assert all(again["training"][m]["reused"] for m in ("sft", "kd", "seqkd", "minillm", "trl", "sft_long", *ablations))
    assert again["training"]["sft"]["seconds"] == results["training"]["sft"]["seconds"]

    # another budget in the same folder is refused (one line), not mixed with the old run
    steps = argv.index("--steps") + 1
    changed = argv[:steps] + ["3"] + argv[steps + 1 :] + ["--methods", "sft"]
    before = {f: (out / f).read_text() for f in ("results.json", "table.md")}
    assert compare.main(changed) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "steps 2" in err
    assert {f: (out / f).read_text() for f in before} == before  # nothing of the old run was rewritten


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _close(a, b) -> bool:
    import torch

    return torch.allclose(a.float(), b.float())


def test_trl_resumes_from_its_last_checkpoint(tmp_path, sharp_dir, tiny_data):
    pytest.importorskip("trl")
    out = tmp_path / "cmp"
    argv = [
        "--tiny",
        "--methods",
        "trl",  # sft is added: trl starts from the SFT student
        "--teacher",
        str(sharp_dir),
        "--train",
        tiny_data["train"],
        "--test",
        f"a={tiny_data['valid']}",
        "--corpus",
        tiny_data["corpus"],
        "--steps",
        "2",
        "--minillm-steps",
        "3",  # a Trainer checkpoint every step, the last two kept
        "--batch-size",
        "2",
        "--start-steps",
        "2",
        "--layer-stride",
        "3",
        "--seeds",
        "10",
        "--max-examples",
        "2",
        "--max-new-tokens",
        "4",
        "--gen-tokens",
        "4",
        "--exacc-lengths",
        "2,4",
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
    trl = out / "trl"
    assert json.loads((trl / "resumed_from.json").read_text())["checkpoint"] is None
    assert sorted(p.name for p in (trl / "trainer").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    # as if killed after step 2: the last checkpoint and the export are gone
    import shutil

    shutil.rmtree(trl / "trainer" / "checkpoint-3")
    shutil.rmtree(trl / "final")
    (trl / "settings.json").unlink()
    assert compare.main(argv) == 0
    assert json.loads((trl / "resumed_from.json").read_text())["checkpoint"].endswith("checkpoint-2")
    history = json.loads((trl / "log_history.json").read_text())
    assert max(h.get("step", 0) for h in history) == 3
    assert (trl / "final" / "model.safetensors").is_file()
    # other settings: the old checkpoints are not resumed from
    (trl / "settings.json").unlink()
    steps = argv.index("--seeds")  # an eval setting only: training settings must stay, so change lr instead
    changed = argv[:steps] + ["--lr", "1e-3"] + argv[steps:] + ["--overwrite"]
    assert compare.main(changed) == 0
    assert json.loads((trl / "resumed_from.json").read_text())["checkpoint"] is None

"""eval/comparison/merge.py: a re-run beside a published comparison, refused unless it rebuilt the same models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "eval"))

from comparison.merge import merge, same_scores  # noqa: E402

from minidistill.errors import UserError  # noqa: E402

SETTINGS = {"tests": {"dolly_test": "d.jsonl"}, "bootstrap": 200, "seeds": [1, 2], "exacc_lengths": [4],
            "max_new_tokens": 8, "max_examples": 3, "control_examples": 3, "start_steps": 1, "steps": 1,
            "batch_size": 1, "minillm_steps": 1, "teacher": "t"}  # fmt: skip


def _summary(scores: dict[str, list[float]]) -> dict:
    mean = sum(sum(v) for v in scores.values()) / sum(len(v) for v in scores.values())
    ds = {"rougeL": mean, "rougeL_ci95": None, "reverse_kl_own_samples": None, "forward_kl_teacher_samples": None,
          "reverse_kl_gold": None, "forward_kl_gold": None, "distinct_4": 1.0, "mean_length": 5.0,
          "eos_rate": 0.5, "exaccerr": None}  # fmt: skip
    return {"datasets": {"dolly_test": ds}, "item_scores": {"dolly_test": scores}, "seconds": 1.0}


def _folder(path: Path, models: dict[str, dict[str, list[float]]]) -> Path:
    path.mkdir(parents=True)
    results = {"settings": SETTINGS, "train_data": {"n_examples": 4}, "models": {n: {} for n in models},
               "training": {n: {"steps": 1, "init": "start", "seconds": 2.0} for n in models if n != "teacher"}}  # fmt: skip
    (path / "results.json").write_text(json.dumps(results))
    for name, scores in models.items():
        (path / f"{name}.summary.json").write_text(json.dumps(_summary(scores)))
    return path


TEACHER = {"0": [30.0, 32.0], "1": [20.0, 22.0], "2": [10.0, 14.0]}
SFT = {"0": [10.0, 12.0], "1": [8.0, 8.0], "2": [5.0, 7.0]}
KD = {"0": [11.0, 11.0], "1": [9.0, 9.0], "2": [6.0, 6.0]}
OLD = {"0": [12.0, 12.0], "1": [9.0, 11.0], "2": [6.0, 6.0]}
NEW = {"0": [14.0, 16.0], "1": [10.0, 12.0], "2": [9.0, 9.0]}


def test_merge_pairs_the_new_model_with_the_published_rows(tmp_path):
    pub = _folder(tmp_path / "pub", {"teacher": TEACHER, "sft": SFT, "kd": KD, "minillm": OLD})
    new = _folder(tmp_path / "new", {"teacher": TEACHER, "sft": SFT, "minillm": NEW})
    results, table = merge(pub, new, ["minillm"], {"minillm": "minillm_const"}, ["teacher", "sft"])
    assert list(results["models"]) == ["teacher", "sft", "kd", "minillm", "minillm_const"]
    paired = results["paired"]
    # closed forms: mean over items of the seed-mean differences
    assert paired["minillm - kd"]["dolly_test"]["diff"] == pytest.approx(((15 - 11) + (11 - 9) + (9 - 6)) / 3)
    assert paired["minillm_const - minillm"]["dolly_test"]["diff"] == pytest.approx(
        ((12 - 15) + (10 - 11) + (6 - 9)) / 3
    )
    assert paired["minillm - sft"]["dolly_test"]["n_items"] == 3
    assert results["merge"]["checked_identical"]["sft"]["dolly_test"]["identical"] is True
    assert "published minillm shown as minillm_const" in table and "| minillm_const |" in table


def test_merge_refuses_a_rerun_that_did_not_rebuild_the_same_model(tmp_path):
    pub = _folder(tmp_path / "pub", {"teacher": TEACHER, "sft": SFT, "minillm": OLD})
    changed = {**SFT, "2": [5.0, 7.5]}  # one sample of one item differs: another SFT student
    new = _folder(tmp_path / "new", {"teacher": TEACHER, "sft": changed, "minillm": NEW})
    with pytest.raises(UserError, match=r"--check sft: .*dolly_test \(max \|diff\| 0.5\)"):
        merge(pub, new, ["minillm"], {"minillm": "minillm_const"}, ["teacher", "sft"])
    # a published model taking the re-run's place without a new name would be listed twice
    same = _folder(tmp_path / "same", {"teacher": TEACHER, "sft": SFT, "minillm": NEW})
    with pytest.raises(UserError, match="used twice"):
        merge(pub, same, ["minillm"], {}, ["sft"])


def test_same_scores_reports_the_largest_difference():
    a, b = {"item_scores": {"x": {"0": [1.0, 2.0]}}}, {"item_scores": {"x": {"0": [1.0, 2.25]}}}
    assert same_scores(a, b) == {"x": {"n_items": 1, "identical": False, "max_abs_diff": 0.25}}
    assert same_scores(a, a)["x"]["identical"] is True


def test_table_header_names_the_training_seeds():
    from comparison.report import _seeds

    assert _seeds({"seed": 42, "minillm_seed": 43}) == ", training seed 42 (MiniLLM, TRL and the ablations: 43)"
    assert _seeds({"seed": 42, "minillm_seed": None}) == ", training seed 42"
    assert _seeds({}) == ""  # a results.json that does not record it (the merge test's settings)

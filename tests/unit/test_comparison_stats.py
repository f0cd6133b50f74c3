"""eval/comparison: the pure statistics against closed forms, and the typed plan built from the flags."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "eval"))

from comparison import stats  # noqa: E402
from comparison.cli import build_parser  # noqa: E402
from comparison.plan import TRAINING_KEYS, Plan  # noqa: E402

from minidistill.errors import UserError  # noqa: E402


def test_ci95():
    mean, half = stats.ci95([10.0, 12.0, 14.0])
    assert mean == pytest.approx(12.0)
    assert half == pytest.approx(4.303 * 2.0 / 3**0.5, rel=1e-4)
    assert stats.ci95([5.0]) == (5.0, None)


def test_ci95_quantile_lookup():
    # df 11 is not in the table: the closest smaller entry (df 10, 2.228) is used; df > 120: the normal 1.960
    values = [float(i) for i in range(12)]  # sd of 0..11 = sqrt(13)
    mean, half = stats.ci95(values)
    assert mean == pytest.approx(5.5) and half == pytest.approx(2.228 * math.sqrt(13.0) / math.sqrt(12))
    many = [0.0, 2.0] * 100  # 200 values, sd = sqrt(200 / 199)
    assert stats.ci95(many)[1] == pytest.approx(1.960 * math.sqrt(200 / 199) / math.sqrt(200))


def test_item_means():
    assert stats.item_means({"0": [1.0, 3.0], "7": [5.0]}) == {"0": 2.0, "7": 5.0}


def test_paired_diff_closed_forms():
    a = {str(i): [float(i), float(i) + 2.0] for i in range(20)}  # item means i + 1
    shifted = {i: [v - 3.0 for v in s] for i, s in a.items()}
    same = stats.paired_diff(a, a, n=500)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and not same["excludes_0"]
    d = stats.paired_diff(a, shifted, n=500)  # a constant per-item gap has no spread
    assert d["diff"] == pytest.approx(3.0) and d["ci95"] == pytest.approx([3.0, 3.0]) and d["excludes_0"]
    mean, lo, hi = stats.bootstrap_ci([float(i) for i in range(100)], n=2000)
    assert mean == pytest.approx(49.5) and lo < 49.5 < hi
    # the standard error of the mean of 0..99 is 28.87 / 10 = 2.89; the 95% interval is ~ 2 x 1.96 x 2.89 = 11.3 wide
    assert 10.0 < hi - lo < 12.7
    partial = stats.paired_diff(a, {"0": [0.0], "1": [0.0]}, n=100)  # only the common items pair
    assert partial["n_items"] == 2 and partial["diff"] == pytest.approx(1.5)


def test_bootstrap_ci_is_seeded_and_needs_values():
    values = [1.0, 4.0, 2.0, 8.0, 5.0]
    assert stats.bootstrap_ci(values, n=300, seed=3) == stats.bootstrap_ci(values, n=300, seed=3)
    assert stats.bootstrap_ci([2.5] * 4, n=50) == (2.5, 2.5, 2.5)  # no spread: every resample mean is 2.5
    with pytest.raises(ValueError):
        stats.bootstrap_ci([], n=10)


def test_statistics_labels_and_directions():
    minillm = {"ds": {"0": [3.0], "1": [5.0]}}
    summaries = {
        "sft": {"item_scores": {"ds": {"0": [1.0], "1": [2.0]}}},
        "minillm": {"item_scores": minillm},
        "minillm_a0": {"item_scores": {"ds": {"0": [4.0], "1": [4.0]}, "other": {"0": [1.0]}}},
    }
    ci, paired = stats.statistics(summaries, 200, ablations=("minillm_a0",))
    assert set(ci) == {"sft", "minillm", "minillm_a0"} and set(ci["minillm_a0"]) == {"ds", "other"}
    assert ci["sft"]["ds"]["mean"] == pytest.approx(1.5)
    # main models: minillm - model; ablations: ablation - minillm, on the test sets both have
    assert set(paired) == {"minillm - sft", "minillm_a0 - minillm"}
    assert paired["minillm - sft"]["ds"]["diff"] == pytest.approx(((3 - 1) + (5 - 2)) / 2)
    assert paired["minillm_a0 - minillm"]["ds"]["diff"] == pytest.approx(((4 - 3) + (4 - 5)) / 2)
    assert set(paired["minillm_a0 - minillm"]) == {"ds"}
    assert stats.statistics({"sft": summaries["sft"]}, 50, ablations=())[1] == {}  # no minillm: nothing paired


# ------------------------------------------------------------------ the plan


def _files(tmp_path: Path) -> list[str]:
    for name in ("train.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text('{"instruction": "x", "input": "", "output": "y"}\n')
    return ["--train", str(tmp_path / "train.jsonl"), "--test", f"a={tmp_path / 'a.jsonl'}"]


def test_plan_from_args_defaults_and_types(tmp_path):
    args = build_parser().parse_args(
        _files(tmp_path) + ["--corpus", str(tmp_path / "c.txt"), "--methods", "minillm,kd", "--out", str(tmp_path)]
    )
    plan = Plan.from_args(args)
    assert plan.methods == ["sft", "kd", "minillm"]  # sft added (minillm starts from it), in the paper's order
    assert plan.minillm_steps == plan.steps == 50 and plan.train_examples == 50 * 8 and plan.train_examples_auto
    assert plan.seeds == [10, 20, 30] and plan.exacc_lengths == [48, 96]
    assert plan.tests == {"a": str((tmp_path / "a.jsonl").resolve())} and plan.control_tests == ["a"]
    assert plan.corpus == plan.lpt_corpus == [str((tmp_path / "c.txt").resolve())]
    assert plan.control_examples == plan.max_examples == 150 and plan.publish is None
    assert plan.precision in ("bf16", "fp32") and plan.eval_dtype == plan.precision  # auto, on this machine
    assert (plan.block_len, plan.max_length) == (256, 384)  # not --tiny
    settings = plan.settings()
    assert "progress" not in settings and "overwrite" not in settings and settings["steps"] == 50
    assert set(TRAINING_KEYS) <= set(settings)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps"),
        (["--exacc-lengths", "48,200"], "--exacc-lengths"),
        (["--control-tests", "zzz"], "--control-tests"),
        (["--methods", "sft,bogus"], "bogus"),
        (["--seeds", "a,b"], "--seeds"),
    ],
)
def test_plan_from_args_refuses(tmp_path, flags, message):
    args = build_parser().parse_args(_files(tmp_path) + ["--corpus", str(tmp_path / "c.txt")] + flags)
    with pytest.raises(UserError, match=message):
        Plan.from_args(args)


def test_minillm_seed_reaches_only_the_methods_from_the_sft_student(tmp_path):
    """--minillm-seed: another training draw of minillm/trl/the ablations on the same start and
    SFT student; the start and the methods from it keep --seed. Unset: --seed everywhere."""
    from comparison.methods import method_recipe, start_recipe
    from comparison.plan import stage_seed

    base = _files(tmp_path) + ["--corpus", str(tmp_path / "c.txt"), "--out", str(tmp_path / "o"), "--seed", "5"]
    train = tmp_path / "train.jsonl"
    plan = Plan.from_args(build_parser().parse_args(base + ["--minillm-seed", "7", "--methods", "minillm,kd,trl"]))
    assert [stage_seed(m, plan) for m in ("sft", "kd", "minillm", "trl", "minillm_split")] == [5, 5, 7, 7, 7]
    assert start_recipe(plan).seed == 5
    assert method_recipe("sft", plan, tmp_path, train).seed == 5
    assert method_recipe("minillm", plan, tmp_path, train).seed == 7
    assert method_recipe("minillm_a0", plan, tmp_path, train).seed == 7
    plain = Plan.from_args(build_parser().parse_args(base))
    assert plain.minillm_seed is None and method_recipe("minillm", plain, tmp_path, train).seed == 5

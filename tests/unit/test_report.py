"""Tests for minidistill.reporting.report: report.md + PNG plots from a synthetic run folder."""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import pytest

from minidistill.reporting import report as R


def make_run(run: Path, n_minillm: int = 120, n_pd: int = 150, seed: int = 0) -> Path:
    """A run folder that looks like a real one: sft -> minillm -> pd metrics, eval outputs, recipe."""
    rng = random.Random(seed)
    run.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t = 1_700_000_000.0

    def log(stage, step, **kv):
        nonlocal t
        t += 3.0
        rows.append({"time": round(t, 3), "stage": stage, "step": step, **kv})

    for s in range(1, 21):
        log(
            "sft",
            s,
            loss=3.0 * math.exp(-s / 8) + 1.2 + rng.gauss(0, 0.1),
            lr=1e-4 * min(1, s / 5),
            tokens=900.0,
            tokens_per_s=300.0,
            step_time_s=3.0,
            skipped_steps=0,
            grad_norm=1.0,
        )
        if s % 10 == 0:
            log(
                "sft",
                s,
                **{"valid/loss": 2.0 * math.exp(-s / 10) + 1.4, "valid/ppl": math.exp(2.0 * math.exp(-s / 10) + 1.4)},
            )
    for s in range(1, n_minillm + 1):
        rkl = 0.9 * math.exp(-s / 50) + 0.3 + rng.gauss(0, 0.08)
        log(
            "minillm",
            s,
            loss=-0.05 + rng.gauss(0, 0.2),
            lr=5e-6,
            tokens=1500.0,
            pg_loss=rng.gauss(0, 0.2),
            clip_frac=max(0.0, 0.08 + rng.gauss(0, 0.03)),
            single_step_kl=0.8 * rkl,
            lm_loss=2.6 + rng.gauss(0, 0.05),
            reward=-rkl,
            rkl_estimate=rkl,
            response_length=60 + 20 * (1 - math.exp(-s / 40)) + rng.gauss(0, 6),
            eos_rate=0.8,
            cut_rate=0.2,
            repeat_rate=0.1 + 0.1 * (s > 60),
            ratio_new_old=1.0,
        )
        if s % 40 == 0:
            log("minillm", s, **{"valid/rougeL": 18 + 6 * (1 - math.exp(-s / 60)), "valid/mean_length": 70.0})
    log("pd", 0, **{"valid/loss": 6.0, "valid/ppl": math.exp(6.0), "valid/kd_loss": 3.0})
    for s in range(1, n_pd + 1):
        a = 0.9 if s < 0.8 * n_pd else 0.9 * (n_pd - s) / (0.2 * n_pd)
        lm = 3.5 * math.exp(-s / 60) + 3.0 + rng.gauss(0, 0.2)
        kd = 2.0 * math.exp(-s / 50) + 0.8 + rng.gauss(0, 0.1)
        log("pd", s, loss=(1 - a) * lm + a * kd, alpha=a, lm_loss=lm, kd_loss=kd, lr=5e-4, tokens=2048.0)
        if s % 50 == 0:
            v = 3.5 * math.exp(-s / 60) + 3.2
            log("pd", s, **{"valid/loss": v, "valid/ppl": math.exp(v), "valid/kd_loss": 1.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "recipe.yaml").write_text(
        "output_dir: x\nseed: 0\nstages:\n- {type: sft, name: sft}\n- {type: minillm, name: minillm}\n"
        "- {type: pd, name: pd}\n"
    )
    for name, rouge, length in (("eval/sft", 22.5, 71.0), ("eval/minillm", 24.4, 76.5)):
        d = run / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text(json.dumps({"rougeL": rouge, "mean_length": length, "n_examples": 100}))
    L = list(range(1, 65))
    ex = [30 * (1 - math.exp(-x / 20)) for x in L]
    (run / "eval" / "minillm" / "analysis.json").write_text(
        json.dumps(
            {
                "reverse_kl": 0.4,
                "forward_kl": 0.8,
                "mean_length": 70.0,
                "distinct_4": 0.9,
                "ece": 0.03,
                "exaccerr": {"16": ex[15], "64": ex[63]},
                "samples": {"reverse_kl": 0.4, "distinct_4": 0.9},
                "teacher_samples": {"forward_kl": 0.8},
                "reference": {"reverse_kl": 0.5, "forward_kl": 0.9},
                "calibration": {
                    "ece": 0.03,
                    "accuracy": 0.4,
                    "bins": [
                        {
                            "lo": b / 10,
                            "hi": (b + 1) / 10,
                            "count": 10,
                            "accuracy": (b + 0.4) / 10,
                            "confidence": (b + 0.5) / 10,
                        }
                        for b in range(10)
                    ],
                },
                "exposure_bias": {
                    "lengths": [16, 64],
                    "exaccerr": [ex[15], ex[63]],
                    "curve": {"lengths": L, "exaccerr": ex},
                },
            }
        )
    )
    (run / "eval_table.json").write_text(
        json.dumps([{"model": "teacher", "rougeL": 27.0, "reverse_kl": 0.0, "forward_kl": 0.0, "mean_length": 80.0}])
    )
    return run


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run"))
    return run, R.write_report(run)


def test_report_files_and_pngs(report_run):
    run, path = report_run
    assert path == run / "report.md" and path.is_file()
    md = path.read_text()
    for heading in (
        "## Stages",
        "## Evaluation",
        "## Analyses",
        "## Training curves",
        "### minillm (minillm)",
        "### pd (pd)",
        "## Recipe",
    ):
        assert heading in md
    pngs = sorted((run / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    expected = {
        "minillm_loss.png",
        "minillm_kl.png",
        "minillm_reward.png",
        "minillm_response_length.png",
        "minillm_stopping.png",
        "minillm_clip_frac.png",
        "minillm_lm_loss.png",
        "minillm_valid_rougeL.png",
        "pd_loss.png",
        "pd_alpha.png",
        "pd_valid_ppl.png",
        "sft_loss.png",
        "eval_rougeL.png",
        "eval_reverse_kl.png",
        "eval_forward_kl.png",
        "eval_mean_length.png",
        "exposure_bias.png",
        "calibration.png",
    }
    assert expected <= names
    for p in pngs:
        w, h = png_size(p)
        assert p.stat().st_size > 8_000, p
        assert 500 <= w <= 700 and 200 <= h <= 600, (p, w, h)  # ~6 in wide at 100 dpi
        assert f"](plots/{p.name})" in md  # every plot is embedded, by a relative path
    assert not list(run.glob(".*.tmp")) and not list((run / "plots").glob(".*"))


def test_report_tables(report_run):
    run, path = report_run
    md = path.read_text()
    # stage table: steps, train tokens
    assert "| minillm | minillm | 120 |" in md and "| pd | pd | 150 |" in md
    # evaluation table: eval_table.json row first, then one merged row per folder (summary + analysis)
    lines = [line for line in md.splitlines() if line.startswith("| teacher |") or line.startswith("| eval/")]
    assert lines[0].startswith("| teacher | 27 | 0 | 0 | 80 |")
    assert any(line.startswith("| eval/minillm | 24.4 | 0.4 | 0.8 | 76.5 |") for line in lines)
    assert "16: " in md and "ExAccErr" in md


def test_series_last_value_wins_and_bad_rows(tmp_path):
    rows = [
        {"stage": "s", "step": 1, "loss": 5.0},
        {"stage": "s", "step": 2, "loss": "nan"},
        {"stage": "s", "step": 2, "loss": 4.0},
        {"stage": "s", "step": 1, "loss": 3.0},  # resumed: step 1 again
        {"stage": "s", "step": 3, "loss": True},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    data = R.load_run(tmp_path)
    assert data.series("s", "loss") == ([1.0, 2.0], [3.0, 4.0])
    assert any("not JSON" in p for p in data.problems)
    assert R.stage_type(data, "s") == "default"  # no recipe.yaml: type unknown, the loss plots
    out = R.write_report(tmp_path)
    assert (tmp_path / "plots" / "s_loss.png").is_file() and "Skipped inputs" in out.read_text()


def test_smooth_hand_computed():
    assert R.smooth([1, 2, 3, 4, 5], window=3) == pytest.approx([1.5, 2, 3, 4, 4.5])
    assert R.smooth([1, 2, 3]) == [1, 2, 3]  # too few points: unchanged
    assert len(R.smooth(list(range(100)))) == 100


def test_report_cli(tmp_path, capsys):
    assert R.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "empty").mkdir()
    assert R.main([str(tmp_path / "empty")]) == 0  # nothing to plot is not an error
    assert (tmp_path / "empty" / "report.md").is_file()


def test_example_answers_side_by_side(tmp_path):
    """eval_examples.json (the evaluate stage) -> one table row per prompt, one column per model, the
    text HTML-escaped with <br> line breaks and whether each answer stopped."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval_table.json").write_text(json.dumps([{"model": "teacher", "rougeL": 10.0}]))
    answers = {
        "teacher": {"text": "Line one\nline <two> | end", "stopped": True, "tokens": 7},
        "sft": {"text": "", "stopped": False, "tokens": 96},
        "student": {"text": "short", "stopped": True, "tokens": 1},
    }
    examples = [
        {"instruction": "Name a colour.", "input": "", "answers": answers},
        {"instruction": "Add the numbers.", "input": "2 and 3", "answers": {"teacher": answers["teacher"]}},
    ]
    (run / "eval_examples.json").write_text(json.dumps(examples))
    text = R.write_report(run).read_text()
    section = text.split("### Example answers", 1)[1].split("\n## ", 1)[0]
    lines = [l for l in section.splitlines() if l.startswith("| ")]
    assert lines[0] == "| prompt | teacher | sft | student |"
    assert lines[1].startswith("| Name a colour. | Line one<br>line &lt;two&gt; \\| end<br>*(7 tokens, stopped)* |")
    assert "(empty)<br>*(96 tokens, cut at the limit)*" in lines[1] and "short<br>*(1 tokens, stopped)*" in lines[1]
    assert lines[2].startswith("| Add the numbers.<br><br>2 and 3 |") and lines[2].endswith("| - | - |")
    (run / "eval_examples.json").write_text("{not json")
    text = R.write_report(run).read_text()
    assert "### Example answers" not in text and "eval_examples.json: not readable JSON" in text

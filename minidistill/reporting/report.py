"""Run report: ``report.md`` and PNG plots from a run folder.

    python -m minidistill.report RUN_DIR

Reads (all optional except the folder itself):

* ``RUN_DIR/metrics.jsonl`` (rows {"stage", "step", "time", metric keys...}; validation keys
  start with ``valid/``): per-stage training curves;
* ``RUN_DIR/recipe.yaml``: stage types and the recipe, shown at the end of the report;
* ``RUN_DIR/**/summary.json`` (eval/instruct_eval.py: rougeL, mean_length, ...) and
  ``RUN_DIR/**/analysis.json`` (eval/analyze.py: KL, Dist-4, ECE, ExAccErr): one evaluation row
  per folder (named by its path relative to RUN_DIR);
* ``RUN_DIR/eval_table.json``: a list of rows {"model": name, "rougeL", "reverse_kl",
  "forward_kl", "mean_length", ...}; listed first, before the rows found in folders;
* ``RUN_DIR/eval_examples.json`` (the evaluate stage): a few prompts with every model's answer,
  shown side by side.

Writes ``RUN_DIR/report.md`` and ``RUN_DIR/plots/*.png`` (Agg backend, ~6x3.5 in at 100 dpi):
curves per stage (noisy training curves lightly smoothed over the faint raw curve; validation
points with markers), one bar chart per evaluation metric, ExAccErr vs generation length and a
reliability diagram when analyses exist. Every file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minidistill.errors import UserError
from minidistill.stages import LOSS_PLOTS, TYPES, Plot, stage

__all__ = ["write_report", "load_run", "main"]

FIGSIZE = (6.0, 3.5)
DPI = 100
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


# --------------------------------------------------------------------------------------------
# What to plot
# --------------------------------------------------------------------------------------------


LABELS = {
    "loss": "train loss",
    "valid/loss": "valid loss",
    "valid/total": "valid loss (training mix)",
    "valid/kd": "valid KD divergence",
    "rkl_estimate": "reverse KL estimate (rollouts)",
    "mix_log_ratio": "log q - log p on mixture samples",
    "single_step_kl": "single-step KL",
    "reward": "reward",
    "response_length": "rollout length",
    "eos_rate": "stopped with EOS",
    "cut_rate": "cut at max_new_tokens",
    "repeat_rate": "repeats a 4-gram",
    "valid/mean_length": "valid generation length",
    "clip_frac": "clip fraction",
    "lm_loss": "LM loss",
    "kd_loss": "KD loss",
    "valid/kd_loss": "valid KD loss",
    "alpha": "alpha",
    "valid/ppl": "valid perplexity",
    "valid/rougeL": "valid ROUGE-L",
    "lr": "learning rate",
    "teacher_kept_mass": "teacher kept mass",
    "student_kept_mass": "student mass on kept tokens",
    "pg_loss": "policy-gradient loss",
}

LR_PLOT = Plot("lr", ["lr"], "Learning rate schedule", "learning rate", smooth=False)
SKIP_KEYS = {
    "time",
    "stage",
    "step",
    "tokens",
    "tokens_per_s",
    "step_time_s",
    "skipped_steps",
    "grad_norm",
    "ratio_new_old",
    "pg_loss",
}

EVAL_METRICS = [  # key, column title, axis label, "higher"/"lower" is better
    ("rougeL", "ROUGE-L", "ROUGE-L F (x100)", "higher"),
    ("reverse_kl", "reverse KL", "KL(q||p), nats/token", "lower"),
    ("forward_kl", "forward KL", "KL(p||q), nats/token", "lower"),
    ("mean_length", "mean length", "tokens", None),
    ("eos_rate", "EOS rate", "share of responses that stopped", None),
    ("ece", "ECE", "ECE (fraction)", "lower"),
    ("distinct_4", "Dist-4", "distinct 4-grams (fraction)", None),
]


# --------------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{path}: not readable JSON ({type(e).__name__}); skipped")
        return None


def _read_metrics(path: Path, problems: list[str]) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            problems.append(f"{path}:{n}: not JSON; line skipped")
            continue
        if isinstance(row, dict) and "stage" in row and "step" in row:
            rows.append(row)
    return rows


@dataclass
class RunData:
    run_dir: Path
    rows: list[dict] = field(default_factory=list)
    recipe_text: str | None = None
    stage_types: dict[str, str] = field(default_factory=dict)
    stage_order: list[str] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    analyses: list[tuple[str, dict]] = field(default_factory=list)
    summaries: list[tuple[str, dict]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def series(self, stage: str, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of ``key`` in ``stage``, sorted by step; the last value logged at a step wins."""
        by_step: dict[float, float] = {}
        for r in self.rows:
            if r.get("stage") == stage and key in r:
                step, v = _num(r.get("step")), _num(r[key])
                if step is not None and v is not None:
                    by_step[step] = v
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def keys(self, stage: str) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.rows:
            if r.get("stage") == stage:
                for k, v in r.items():
                    if k not in SKIP_KEYS and _num(v) is not None:
                        seen.setdefault(k, None)
        return list(seen)


def _row_name(folder: Path, run_dir: Path) -> str:
    rel = folder.relative_to(run_dir)
    return str(rel) if str(rel) != "." else run_dir.name


def load_run(run_dir: str | Path) -> RunData:
    """Everything the report uses from ``run_dir`` (missing files are simply absent)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found")
    data = RunData(run_dir=run_dir)
    data.rows = _read_metrics(run_dir / "metrics.jsonl", data.problems)
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file():
        import yaml

        data.recipe_text = recipe.read_text(encoding="utf-8")
        try:
            parsed = yaml.safe_load(data.recipe_text) or {}
            for s in parsed.get("stages") or []:
                if isinstance(s, dict) and "name" in s:
                    data.stage_types[str(s["name"])] = str(s.get("type", s["name"]))
                    data.stage_order.append(str(s["name"]))
        except yaml.YAMLError:
            data.problems.append(f"{recipe}: not valid YAML; stage types unknown (default plots)")
    for r in data.rows:
        if str(r["stage"]) not in data.stage_order:
            data.stage_order.append(str(r["stage"]))

    table = run_dir / "eval_table.json"
    if table.is_file():
        rows = _read_json(table, data.problems)
        if isinstance(rows, list):
            data.eval_rows = [dict(r) for r in rows if isinstance(r, dict) and "model" in r]
        elif rows is not None:
            data.problems.append(f"{table}: expected a list of rows with a 'model' key; skipped")
    answers = run_dir / "eval_examples.json"
    if answers.is_file():
        ex = _read_json(answers, data.problems)
        if isinstance(ex, list):
            data.examples = [e for e in ex if isinstance(e, dict) and isinstance(e.get("answers"), dict)]
        elif ex is not None:
            data.problems.append(f"{answers}: expected a list of prompts with 'answers'; skipped")

    found: dict[str, dict] = {}
    for path in sorted(run_dir.rglob("summary.json")):
        s = _read_json(path, data.problems)
        if isinstance(s, dict) and _num(s.get("rougeL")) is not None:
            name = _row_name(path.parent, run_dir)
            data.summaries.append((name, s))
            found.setdefault(name, {"model": name}).update({"rougeL": s["rougeL"], "mean_length": s.get("mean_length")})
    for path in sorted(run_dir.rglob("analysis.json")):
        a = _read_json(path, data.problems)
        if isinstance(a, dict) and "samples" in a:
            name = _row_name(path.parent, run_dir)
            data.analyses.append((name, a))
            row = found.setdefault(name, {"model": name})
            for k in ("reverse_kl", "forward_kl", "ece", "distinct_4"):
                if a.get(k) is not None:
                    row[k] = a[k]
            row.setdefault("mean_length", a.get("mean_length"))
    listed = {str(r["model"]) for r in data.eval_rows}
    data.eval_rows += [r for name, r in found.items() if name not in listed]
    return data


def stage_type(data: RunData, stage: str) -> str:
    """The stage's type from the run's recipe.yaml ("default" without one)."""
    return data.stage_types.get(stage, "default")


def stage_plots(kind: str) -> tuple[Plot, ...]:
    """The figures the stage type declares (``STAGE.plots``; imports its module); the loss plots
    for types minidistill does not know."""
    return stage(kind).plots if kind in TYPES else LOSS_PLOTS


def plots_for(data: RunData, stage: str) -> list[Plot]:
    """The stage type's plots that have data, then one plot per remaining validation key, then lr."""
    base = stage_plots(stage_type(data, stage))
    present = set(data.keys(stage))
    plots = [Plot(p.name, [k for k in p.keys if k in present], p.title, p.ylabel, p.logy, p.smooth) for p in base]
    plots = [p for p in plots if p.keys]
    covered = {k for p in plots for k in p.keys}
    for k in sorted(present - covered):
        if k.startswith("valid/"):
            short = k.split("/", 1)[1]
            plots.append(Plot(f"valid_{short}", [k], f"Validation {short}", short))
    if "lr" in present:
        plots.append(LR_PLOT)
    return plots


# --------------------------------------------------------------------------------------------
# Plotting
# --------------------------------------------------------------------------------------------


def smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Centered moving average (no lag; the window shrinks at the ends). Default window: about
    n/15 points, odd, between 3 and 51; fewer than 8 points are returned unchanged."""
    n = len(values)
    if window is None:
        if n < 8:
            return list(values)
        window = min(51, max(3, round(n / 15)))
    half = max(0, int(window) // 2)
    csum = [0.0]
    for v in values:
        csum.append(csum[-1] + v)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        out.append((csum[hi] - csum[lo]) / (hi - lo))
    return out


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)
    return fig, ax


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def plot_curves(data: RunData, stage: str, plot: Plot, path: Path) -> Path | None:
    series = [(k, *data.series(stage, k)) for k in plot.keys]
    series = [(k, s, v) for k, s, v in series if s]
    if not series:
        return None
    positive = [v for _, _, vals in series for v in vals if v > 0]
    use_log = plot.logy and bool(positive) and max(positive) / min(positive) > 5
    fig, ax = _figure()
    for i, (key, steps, values) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        label = LABELS.get(key, key)
        if use_log:
            values = [v if v > 0 else float("nan") for v in values]
        if key.startswith("valid/") or len(steps) < 8:
            ax.plot(steps, values, color=color, marker="o", markersize=3.5, linewidth=1.3, label=label)
        elif not plot.smooth:
            ax.plot(steps, values, color=color, linewidth=1.6, label=label)
        else:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(values), color=color, linewidth=1.6, label=f"{label} (smoothed)")
    ylabel = plot.ylabel
    if use_log:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.4g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ylabel = ylabel.replace(" (log scale)", "")
    if plot.name == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title(f"{stage}: {plot.title}", fontsize=11)
    ax.set_xlabel("optimizer step", fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(series) > 1 or (plot.smooth and any(not k.startswith("valid/") and len(s) >= 8 for k, s, _ in series)):
        ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def plot_eval_bars(rows: list[dict], key: str, title: str, xlabel: str, better: str | None, path: Path) -> Path | None:
    # colour by the model's row (the same model has the same colour in every chart)
    pts = [(str(r["model"]), _num(r.get(key)), COLORS[i % len(COLORS)]) for i, r in enumerate(rows)]
    pts = [p for p in pts if p[1] is not None]
    if not pts:
        return None
    fig, ax = _figure()
    fig.set_size_inches(FIGSIZE[0], max(2.2, min(FIGSIZE[1] + 2, 1.0 + 0.38 * len(pts))))
    names = [m if len(m) <= 28 else "..." + m[-25:] for m, _, _ in pts]
    values = [v for _, v, _ in pts]
    y = list(range(len(pts)))
    ax.barh(y, values, color=[c for _, _, c in pts], height=0.6)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.grid(True, axis="x", color="#dddddd", linewidth=0.6)
    ax.grid(False, axis="y")
    span = max(abs(v) for v in values) or 1.0
    for yi, v in zip(y, values):
        ax.text(
            v + 0.01 * span if v >= 0 else v - 0.01 * span,
            yi,
            f"{v:.3g}",
            va="center",
            ha="left" if v >= 0 else "right",
            fontsize=8,
        )
    lo, hi = min(0.0, min(values)), max(0.0, max(values))
    ax.set_xlim(lo - (0.15 * span if lo < 0 else 0), hi + 0.15 * span)
    suffix = f" ({better} is better)" if better else ""
    ax.set_title(f"Evaluation: {title}{suffix}", fontsize=11)
    ax.set_xlabel(xlabel, fontsize=9)
    return _save(fig, path)


def plot_exposure_bias(analyses: list[tuple[str, dict]], path: Path) -> Path | None:
    fig, ax = _figure()
    drawn = 0
    for i, (name, a) in enumerate(analyses):
        eb = a.get("exposure_bias") or {}
        curve = eb.get("curve") or eb
        pts = [(n, v) for n, v in zip(curve.get("lengths") or [], curve.get("exaccerr") or []) if _num(v) is not None]
        if not pts:
            continue
        color = COLORS[i % len(COLORS)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linewidth=1.4, label=name)
        marks = [(n, v) for n, v in zip(eb.get("lengths") or [], eb.get("exaccerr") or []) if _num(v) is not None]
        ax.plot([p[0] for p in marks], [p[1] for p in marks], "o", color=color, markersize=4)
        drawn += 1
    if not drawn:
        return None
    ax.axhline(0.0, color="#888888", linewidth=0.8, linestyle="--")
    ax.set_title("Exposure bias: ExAccErr vs generation length", fontsize=11)
    ax.set_xlabel("generation length l (tokens)", fontsize=9)
    ax.set_ylabel("ExAccErr(l) (%)", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def plot_reliability(analyses: list[tuple[str, dict]], path: Path) -> Path | None:
    fig, ax = _figure()
    drawn = 0
    for i, (name, a) in enumerate(analyses):
        cal = a.get("calibration") or {}
        pts = [(b["confidence"], b["accuracy"]) for b in cal.get("bins") or [] if b.get("count")]
        if not pts:
            continue
        label = f"{name} (ECE {100 * cal.get('ece', float('nan')):.1f}%)"
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            "o-",
            color=COLORS[i % len(COLORS)],
            markersize=3.5,
            linewidth=1.3,
            label=label,
        )
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="#888888", linewidth=0.8, linestyle="--", label="perfect calibration")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Calibration on gold responses (token level)", fontsize=11)
    ax.set_xlabel("confidence (top-1 probability, bin mean)", fontsize=9)
    ax.set_ylabel("accuracy (fraction correct)", fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _f(v: Any, spec: str = ".4g") -> str:
    v = _num(v)
    return "-" if v is None else format(v, spec)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _stage_summary(data: RunData, stage: str) -> list[str]:
    rows = [r for r in data.rows if r.get("stage") == stage]
    steps = [_num(r.get("step")) for r in rows]
    steps = [s for s in steps if s is not None]
    times = [t for t in (_num(r.get("time")) for r in rows) if t is not None]
    _, loss = data.series(stage, "loss")
    tokens = sum(_num(r.get("tokens")) or 0.0 for r in rows if "loss" in r)
    valid_keys = [k for k in data.keys(stage) if k.startswith("valid/")]
    last_valid = ", ".join(
        f"{k[6:]} {_f(data.series(stage, k)[1][-1])}" for k in valid_keys if data.series(stage, k)[1]
    )
    final_loss = smooth(loss)[-1] if loss else None
    walls = [w for w in (_num(r.get("stage_wall_s")) for r in rows) if w is not None]
    # the run logs each stage's wall time when it ends (summed over resumed parts); older runs: the
    # span of its metric rows, which misses the time before the first row
    wall = sum(walls) if walls else (max(times) - min(times) if len(times) > 1 else None)
    return [
        stage,
        stage_type(data, stage),
        str(int(max(steps))) if steps else "-",
        _duration(wall) if wall is not None else "-",
        f"{tokens:,.0f}" if tokens else "-",
        _f(final_loss),
        last_valid or "-",
    ]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def _cell(text: str) -> str:
    """Free text as one markdown table cell: HTML escaped, line breaks as <br>."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "<br>".join(line.strip() for line in text.strip().splitlines()) or "(empty)"


def _examples_md(examples: list[dict]) -> list[str]:
    """The example answers: one row per prompt, one column per model (in the order first seen)."""
    names = list(dict.fromkeys(n for e in examples for n in e["answers"]))
    rows = []
    for e in examples:
        prompt = str(e.get("instruction", "")) + (f"\n\n{e['input']}" if e.get("input") else "")
        row = [_cell(prompt)]
        for n in names:
            a = e["answers"].get(n)
            if not isinstance(a, dict):
                row.append("-")
                continue
            end = "stopped" if a.get("stopped") else "cut at the limit"
            row.append(f"{_cell(a.get('text', ''))}<br>*({a.get('tokens', '?')} tokens, {end})*")
        rows.append(row)
    return [
        "### Example answers",
        "",
        "Each model's sampled answer (first evaluation seed) to the first held-out prompts; *stopped* = it "
        "ended with EOS, *cut* = it reached the token limit.",
        "",
        *_md_table(["prompt", *names], rows),
        "",
    ]


def _img(path: Path, run_dir: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(run_dir).as_posix()})"


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/plots/*.png``; returns the report's path."""
    data = load_run(run_dir)
    run_dir = data.run_dir
    plots_dir = run_dir / "plots"
    md: list[str] = [
        f"# Run report: {run_dir.resolve().name}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{run_dir}`.",
        "",
    ]

    # ---- stages
    md += ["## Stages", ""]
    if data.stage_order:
        md += _md_table(
            ["stage", "type", "steps", "wall time", "train tokens", "final train loss (smoothed)", "last validation"],
            [_stage_summary(data, s) for s in data.stage_order],
        )
    else:
        md.append("No stages in recipe.yaml and no metrics.jsonl rows.")
    md.append("")

    # ---- evaluation
    if data.eval_rows:
        md += ["## Evaluation", ""]
        cols = [m for m in EVAL_METRICS if any(_num(r.get(m[0])) is not None for r in data.eval_rows)]
        extra = sorted(
            {
                k
                for r in data.eval_rows
                for k, v in r.items()
                if k != "model" and _num(v) is not None and k not in {c[0] for c in EVAL_METRICS}
            }
        )
        header = ["model"] + [c[1] for c in cols] + extra
        md += _md_table(
            header,
            [
                [str(r["model"])] + [_f(r.get(c[0])) for c in cols] + [_f(r.get(k)) for k in extra]
                for r in data.eval_rows
            ],
        )
        md += [
            "",
            "ROUGE-L: F-measure x100 (eval/instruct_eval.py). Reverse KL = KL(q||p) per token on the model's own "
            "samples, forward KL = KL(p||q) per token on the teacher's samples (eval/analyze.py; nats/token). "
            "ECE and Dist-4 are fractions.",
            "",
        ]
        for key, title, xlabel, better in cols:
            p = plot_eval_bars(data.eval_rows, key, title, xlabel, better, plots_dir / f"eval_{_safe(key)}.png")
            if p:
                md += [_img(p, run_dir, f"evaluation {title}"), ""]
    if data.examples:
        if not data.eval_rows:
            md += ["## Evaluation", ""]
        md += _examples_md(data.examples)

    # ---- analyses
    if data.analyses:
        md += ["## Analyses (eval/analyze.py)", ""]
        rows = []
        for name, a in data.analyses:
            s, ref, cal = a.get("samples") or {}, a.get("reference") or {}, a.get("calibration") or {}
            ts = a.get("teacher_samples") or {}
            exacc = a.get("exaccerr") or {}
            rows.append(
                [
                    name,
                    _f(s.get("reverse_kl")),
                    _f(ts.get("forward_kl")),
                    _f(ref.get("reverse_kl")),
                    _f(ref.get("forward_kl")),
                    _f(100 * s["distinct_4"] if _num(s.get("distinct_4")) is not None else None),
                    _f(100 * cal["ece"] if _num(cal.get("ece")) is not None else None),
                    _f(cal.get("accuracy")),
                    ", ".join(f"{n}: {_f(v, '.1f')}" for n, v in exacc.items()) or "-",
                ]
            )
        md += _md_table(
            [
                "model",
                "rev KL (own samples)",
                "fwd KL (teacher samples)",
                "rev KL (gold)",
                "fwd KL (gold)",
                "Dist-4 x100",
                "ECE x100",
                "top-1 acc (gold)",
                "ExAccErr(l) %",
            ],
            rows,
        )
        md += [
            "",
            "ExAccErr(l) = (R(l) - l*eps(l)) / (l*eps(l)) x 100 %: R(l) = forward KL(p||q) summed over the first l "
            "steps of the model's own samples, l*eps(l) = the same over the teacher's samples (MiniLLM; Arora et al. "
            "2022). Near 0: no error beyond what the model makes on teacher prefixes.",
            "",
        ]
        for fn, fname, alt in (
            (plot_exposure_bias, "exposure_bias.png", "ExAccErr"),
            (plot_reliability, "calibration.png", "reliability diagram"),
        ):
            p = fn(data.analyses, plots_dir / fname)
            if p:
                md += [_img(p, run_dir, alt), ""]

    # ---- curves
    stages_with_rows = [s for s in data.stage_order if any(r.get("stage") == s for r in data.rows)]
    if stages_with_rows:
        md += ["## Training curves", ""]
        for stage in stages_with_rows:
            made = []
            for plot in plots_for(data, stage):
                p = plot_curves(data, stage, plot, plots_dir / f"{_safe(stage)}_{_safe(plot.name)}.png")
                if p:
                    made.append(_img(p, run_dir, f"{stage} {plot.title}"))
            if made:
                md += [f"### {stage} ({stage_type(data, stage)})", ""]
                md += [m + "\n" for m in made]

    # ---- recipe and problems
    if data.recipe_text is not None:
        md += [
            "## Recipe",
            "",
            "<details><summary>recipe.yaml</summary>",
            "",
            "```yaml",
            data.recipe_text.rstrip("\n"),
            "```",
            "",
            "</details>",
            "",
        ]
    if data.problems:
        md += ["## Skipped inputs", ""] + [f"- {p}" for p in data.problems] + [""]

    out = run_dir / "report.md"
    tmp = out.with_name(f".report.md.{os.getpid()}.tmp")
    try:
        tmp.write_text("\n".join(md).rstrip("\n") + "\n", encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m minidistill.report",
        description="Write RUN_DIR/report.md and RUN_DIR/plots/*.png from a run folder.",
    )
    p.add_argument("run_dir", help="a run's output_dir (metrics.jsonl, recipe.yaml, eval outputs)")
    args = p.parse_args(argv)
    try:
        path = write_report(args.run_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

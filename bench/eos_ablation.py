"""Why on-policy students lose their EOS (issue 24): a tiny MiniLLM chain run under variants of
the estimator, recording the rollouts' per-step stopping statistics (``eos_rate``, ``cut_rate``,
``repeat_rate``) and the trained student's EOS rate at an evaluation limit. Prints a table and
writes bench/results/eos_ablation.json.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/eos_ablation.py            # all variants
    PYTHONPATH=. .venv/bin/python bench/eos_ablation.py --variants default a0 --steps 20

The chain, all built in-process from tests/tiny_assets.py (no downloads, CPU, fp32):
1. teacher: the tiny 4-layer Llama (byte-level tokenizer) fine-tuned (SFT, ``--teacher-sft``
   steps) on the tiny instruction data, whose answers are 1-9 characters: it answers and stops;
2. student: the teacher's last layer alone (``prune`` [3]) with ``--student-sft`` SFT steps, so
   that it stops in part of its samples at the start, as an SFT student does;
3. each variant: one MiniLLM stage from that student (preset minidistill, a = 0.2, lm_coef 0,
   ``--steps`` optimizer steps, ``--limit`` new tokens per rollout) with the variant's settings;
   every step's rollout statistics come from the run's metrics.jsonl; the final student's EOS
   rate is measured at ``--eval-limit`` new tokens (3 sampling seeds over the valid prompts and
   the first training prompts, T 1), as are the teacher's and the starting student's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import ROOT, arguments, write

sys.path.insert(0, str(ROOT / "tests"))

from tiny_assets import save_tiny_teacher, tiny_recipe, write_tiny_data  # noqa: E402
from tiny_tokenizer import make_tokenizer  # noqa: E402

from minidistill import data, models  # noqa: E402
from minidistill.generation.evaluation import generate_ids  # noqa: E402
from minidistill.parts import rollouts  # noqa: E402
from minidistill.reporting.tracking import read_metrics  # noqa: E402
from minidistill.run import main as run_main  # noqa: E402

# name -> (what it changes, minillm stage overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "default": ("preset minidistill (a = 0.2, step importance, bootstrap, single-step, whiten)", {}),
    "a0": ("mix_alpha 0 (pure student sampling)", {"mix_alpha": 0.0}),
    "exact": ("importance exact (sequence / prefix products)", {"importance": "exact"}),
    "no_bootstrap": ("bootstrap_truncated false", {"bootstrap_truncated": False}),
    "no_single": ("single_step false", {"single_step": False}),
    "no_ss_weight": ("single-step term without importance weight", {"single_step_importance_weight": False}),
    "no_whiten": ("whiten false", {"whiten": False}),
    "no_lennorm": ("length_norm false", {"length_norm": False}),
    "long_rollouts": ("rollout limit 2x the evaluation limit", {"max_new_tokens": "2*eval"}),
    # the fix (student_rows): a share of each buffer drawn at a = 0, the only rows of the long-term term
    "student_rows_0": ("student_rows 0 (today's estimator, explicitly)", {"student_rows": 0.0}),
    "student_rows_25": ("student_rows 0.25", {"student_rows": 0.25}),
    "student_rows_50": ("student_rows 0.5", {"student_rows": 0.5}),
    "student_rows_75": ("student_rows 0.75", {"student_rows": 0.75}),
    "student_rows_50_long": (
        "student_rows 0.5, rollout limit 2x the evaluation limit",
        {"student_rows": 0.5, "max_new_tokens": "2*eval"},
    ),
    # diagnostic only (no recipe key): the split without the rows/student-rows factor on A
    "student_rows_50_noscale": (
        "student_rows 0.5, A not scaled by 2 (bench-only)",
        {"student_rows": 0.5, "_noscale": 1},
    ),
    "student_rows_50_long_noscale": (
        "student_rows 0.5, rollout limit 2x the evaluation limit, A not scaled (bench-only)",
        {"student_rows": 0.5, "max_new_tokens": "2*eval", "_noscale": 1},
    ),
    # mask_truncated: rows cut at the limit carry no long-term term
    "maskcut": ("cut rows out of the long-term term", {"mask_truncated": True}),
    "maskcut_long": (
        "mask_truncated, rollout limit 2x the evaluation limit",
        {"max_new_tokens": "2*eval", "mask_truncated": True},
    ),
    "student_rows_50_maskcut": (
        "student_rows 0.5, mask_truncated",
        {"student_rows": 0.5, "mask_truncated": True},
    ),
    "student_rows_50_long_maskcut": (
        "student_rows 0.5, rollout limit 2x the evaluation limit, mask_truncated",
        {"student_rows": 0.5, "max_new_tokens": "2*eval", "mask_truncated": True},
    ),
    "mix_const": ("mix_alpha_end 0.2: a constant (the default before the schedule)", {"mix_alpha_end": 0.2}),
    "mix_decay": ("mix_alpha_end 0: a from 0.2 to 0 over the run (the default now)", {"mix_alpha_end": 0.0}),
    "mix_const_long": (
        "a constant 0.2, rollout limit 2x the evaluation limit",
        {"mix_alpha_end": 0.2, "max_new_tokens": "2*eval"},
    ),
    "mix_decay_long": (
        "a from 0.2 to 0, rollout limit 2x the evaluation limit",
        {"mix_alpha_end": 0.0, "max_new_tokens": "2*eval"},
    ),
    "a0_long": ("mix_alpha 0, rollout limit 2x the evaluation limit", {"mix_alpha": 0.0, "max_new_tokens": "2*eval"}),
}


NOSCALE = False  # set by the *_noscale variants (bench-only diagnostic)
DIAG: list[dict] = []  # one row per collected buffer (filled by the wrapped advantages_for)
_advantages_for = rollouts.advantages_for


def advantages_with_diagnostics(cfg, ro, reduce_sum=lambda t: t) -> dict:
    """``rollouts.advantages_for`` plus a record of what the update does to stopping: the mean
    advantage of the EOS tokens (last token of the rows that stopped), of the other tokens, the
    mean reward, and the mean reward of the other tokens' future (R from the next token); and
    per kind of row (finished / cut at the limit, over the rows that carry the long-term term):
    the mean reward, return and advantage of their tokens (EOS tokens left out)."""
    out = _advantages_for(cfg, ro, reduce_sum)
    if NOSCALE and ro.mixed is not None:  # the diagnostic variants: undo advantages_for's rows/student-rows factor
        out["advantages"] = out["advantages"] * float((~ro.mixed).sum()) / ro.mixed.numel()
    mask = ro.response_mask.bool()
    lengths = mask.sum(-1)
    own = rollouts.long_term_rows(ro)  # a split buffer (student_rows): only its student rows carry A
    last = torch.zeros_like(mask)
    last[torch.arange(mask.shape[0]), (lengths - 1).clamp(min=0)] = True
    ended = ro.ended.bool()[:, None]
    eos_pos = last & mask & ended
    other = mask & ~eos_pos
    if own is not None:
        eos_pos, other = eos_pos & own[:, None], other & own[:, None]
    A, R, r = out["advantages"].float(), out["returns"].float(), out["rewards"].float()

    def mean(x, m):
        return float((x * m).sum() / m.sum().clamp(min=1))

    fin, cut = other & ended, other & ~ended
    DIAG.append(
        {
            "eos_advantage": mean(A, eos_pos),
            "other_advantage": mean(A, other),
            "eos_return": mean(R, eos_pos),
            "other_return": mean(R, other),
            "reward": mean(r, mask),
            "finished_reward": mean(r, fin),
            "cut_reward": mean(r, cut),
            "finished_return": mean(R, fin),
            "cut_return": mean(R, cut),
            "finished_advantage": mean(A, fin),
            "cut_advantage": mean(A, cut),
            "cut_tokens": float(cut.sum()) / max(float(other.sum()), 1.0),
        }
    )
    return out


rollouts.advantages_for = advantages_with_diagnostics  # collect_buffer looks it up at call time


def stage_dict(name: str, overrides: dict, args) -> dict:
    st = {
        "type": "minillm",
        "name": "minillm",
        "max_steps": args.steps,
        "lr": args.lr,
        "warmup_steps": 0,
        "scheduler": "constant",
        "num_rollouts": args.rollouts,
        "rollout_batch_size": args.rollouts,
        "batch_size": args.batch,
        "ppo_epochs": args.ppo_epochs,
        "max_new_tokens": args.limit,
        "lm_coef": 0.0,
        "eval_examples": 2,
        "eval_max_new_tokens": 4,
        "save_every": 0,
    }
    for k, v in overrides.items():
        if k.startswith("_"):  # bench-only switches, not recipe keys
            continue
        st[k] = 2 * args.eval_limit if v == "2*eval" else v
    return st


def run_recipe(root: Path, tiny_dir: Path, d: dict, stages: list[dict], **top) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(root, tiny_dir, d, stages, **top)))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = run_main([str(path)])
    if rc != 0:
        raise SystemExit(f"{path}: run failed ({rc})")
    return root / "run"


def eos_rate(folder: Path, prompts, limit: int, seeds=(1, 2, 3)) -> dict:
    model, tok = models.load_model(str(folder), device="cpu")
    ended, lengths = [], []
    for seed in seeds:
        new = generate_ids(model, tok, prompts, max_new_tokens=limit, batch_size=16, seed=seed, progress=False)
        ended += [len(r) < limit for r in new]
        lengths += [len(r) for r in new]
    return {"eos_rate": sum(ended) / len(ended), "mean_length": sum(lengths) / len(lengths), "n": len(ended)}


def sft(steps: int) -> dict:
    return {
        "type": "sft",
        "name": "sft",
        "max_steps": steps,
        "lr": 3e-3,
        "batch_size": 8,
        "warmup_steps": 0,
        "scheduler": "constant",
        "save_every": 0,
    }


def build_chain(work: Path, args) -> tuple[Path, Path, dict, list]:
    """(teacher folder, starting student folder, data paths, evaluation prompts)."""
    if work.exists():  # the chain is rebuilt every time (seconds): no stale runs to resume
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    tiny_dir = save_tiny_teacher(work / "tiny")
    d = write_tiny_data(work / "data")
    teacher = (
        run_recipe(work / "teacher", tiny_dir, d, [sft(args.teacher_sft)], student={"init": "config"}) / "sft" / "final"
    )
    student = (
        run_recipe(
            work / "student",
            teacher,
            d,
            [sft(args.student_sft)],
            teacher={"model": str(teacher)},
            student={"init": "prune", "keep_layers": [3]},
        )
        / "sft"
        / "final"
    )
    tok = make_tokenizer()
    ex = data.load_instructions(d["valid"]) + data.load_instructions(d["train"])[:8]
    prompts, _, _ = data.tokenize_prompts(ex, tok, template="alpaca", max_prompt_length=224)
    return teacher, student, d, prompts


def summarise(rows: list[dict]) -> dict:
    """Per-step rollout statistics (one value per optimizer step) and their first/last quarters."""
    keys = ("eos_rate", "cut_rate", "repeat_rate", "response_length", "reward")
    steps = [r for r in rows if "eos_rate" in r]
    series = {k: [r[k] for r in steps] for k in keys}
    q = max(1, len(steps) // 4)
    return {
        "per_step": series,
        "first_quarter": {k: sum(v[:q]) / q for k, v in series.items()},
        "last_quarter": {k: sum(v[-q:]) / q for k, v in series.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=96, help="MiniLLM optimizer steps per variant")
    ap.add_argument("--limit", type=int, default=6, help="max_new_tokens of the rollouts")
    ap.add_argument("--eval-limit", type=int, default=64, help="new tokens when measuring the EOS rate")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rollouts", type=int, default=16, help="num_rollouts per buffer")
    ap.add_argument("--batch", type=int, default=8, help="PPO minibatch (one optimizer step)")
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--teacher-sft", type=int, default=200)
    ap.add_argument("--student-sft", type=int, default=6)
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="recipe seeds (rollout streams) per variant"
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the chain and the runs (default: a new temporary folder, removed at the end)",
    )
    ap.add_argument("--out", default="eos_ablation", help="bench/results/<out>.json")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here (docs/eos/...)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    scratch = args.work is None  # two runs at once never share a folder
    if scratch:
        args.work = Path(tempfile.mkdtemp(prefix="minidistill_eos_ablation_"))
    teacher, student, d, prompts = build_chain(args.work, args)
    ref = {
        "teacher": eos_rate(teacher, prompts, args.eval_limit),
        "teacher_at_limit": eos_rate(teacher, prompts, args.limit),
        "student_start": eos_rate(student, prompts, args.eval_limit),
        "student_start_at_limit": eos_rate(student, prompts, args.limit),
    }
    print(
        f"chain built in {time.perf_counter() - t0:.0f}s: "
        + ", ".join(f"{k} {v['eos_rate']:.2f}" for k, v in ref.items())
    )
    results = {}
    header = (
        f"{'variant':15s} {'seed':>4s} {'eos first':>9s} {'eos last':>8s} {'cut last':>8s} {'rep first':>9s} "
        f"{'rep last':>8s} {'len last':>8s} {'EOS@eval':>8s} {'len@eval':>8s} {'s':>5s}"
    )
    print(header)
    for name in args.variants:
        what, overrides = VARIANTS[name]
        for seed in args.seeds:
            t = time.perf_counter()
            DIAG.clear()
            global NOSCALE
            NOSCALE = bool(overrides.get("_noscale"))
            out = run_recipe(
                args.work / "runs" / f"{name}_s{seed}",
                teacher,
                d,
                [stage_dict(name, overrides, args)],
                teacher={"model": str(teacher)},
                student={"init": "pretrained", "model": str(student)},
                seed=seed,
            )
            s = summarise([r for r in read_metrics(out / "metrics.jsonl") if r.get("stage") == "minillm"])
            final = eos_rate(out / "minillm" / "final", prompts, args.eval_limit)
            final_at_limit = eos_rate(out / "minillm" / "final", prompts, args.limit)
            secs = time.perf_counter() - t
            results[f"{name}/seed{seed}"] = {
                "variant": name,
                "what": what,
                "overrides": stage_dict(name, overrides, args) | {},
                "seed": seed,
                **s,
                "final": final,
                "final_at_limit": final_at_limit,
                "buffers": list(DIAG),
                "buffer_means": {k: sum(b[k] for b in DIAG) / max(len(DIAG), 1) for k in (DIAG[0] if DIAG else {})},
                "seconds": secs,
            }
            f, la = s["first_quarter"], s["last_quarter"]
            bm = results[f"{name}/seed{seed}"]["buffer_means"]
            print(
                f"{name:15s} {seed:4d} {f['eos_rate']:9.2f} {la['eos_rate']:8.2f} {la['cut_rate']:8.2f} "
                f"{f['repeat_rate']:9.2f} {la['repeat_rate']:8.2f} {la['response_length']:8.1f} "
                f"{final['eos_rate']:8.2f} {final['mean_length']:8.1f} {final_at_limit['eos_rate']:7.2f} "
                f"{bm['eos_advantage']:6.2f} {bm['other_advantage']:6.2f} {bm['other_return']:6.2f} {secs:5.0f}"
            )
    write(
        args.out,
        {
            "args": arguments(args),
            "reference": ref,
            "results": results,
            "seconds": time.perf_counter() - t0,
        },
        copy_to=args.json,
    )
    if scratch:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()

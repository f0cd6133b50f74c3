"""Run a recipe: ``python -m minidistill.run RECIPE.yaml [dotted.key=value ...] [--dry-run]``.

From Python: ``minidistill.run.main(["recipe.yaml", "seed=1"])`` (returns the exit code) or
``run_recipe(recipe)`` with a ``RecipeConfig``.

The pipeline: validate the recipe (before any model loads), prepare ``output_dir``, load the
teacher (frozen) and tokenizer, build the student, then run the stages in order; each stage's
``final/`` student is the next stage's input. A stage whose ``final/`` already exists is
skipped when resuming.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from functools import cached_property
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import models
from .config import RecipeConfig, dump_yaml, load_recipe, stage_module
from .errors import UserError
from .tracking import Metrics, console


class Run:
    """What every stage gets: the recipe, accelerate, the teacher, the tokenizer, data, logging."""

    def __init__(self, recipe: RecipeConfig):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        self.recipe = recipe
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            AcceleratorState._reset_state()  # several runs in one Python process (tests, notebooks)
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.precision]
        self.accelerator = Accelerator(mixed_precision=mp, cpu=recipe.device == "cpu")
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        set_seed(recipe.seed)
        self.out_dir = Path(recipe.output_dir)
        self.metrics = Metrics(self.out_dir, enabled=self.accelerator.is_main_process, tensorboard=recipe.tensorboard)
        self.teacher = None
        self.tokenizer = None
        self.vocab_size = None
        self._cache: dict = {}

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def stage_dir(self, name: str) -> Path:
        return self.out_dir / name

    def log(self, stage: str, step: int, values: dict) -> None:
        self.metrics.log(stage, step, values)

    def cached(self, key: str, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # ---- data shared by the stages -------------------------------------------------------
    def instructions(self, split: str):
        """Instruction examples for 'train' or 'valid' (valid falls back to a held-out slice)."""
        from . import data

        d = self.recipe.data

        def load():
            if d.train is None:
                raise UserError("recipe.data.train: required by this stage (instruction data path)")
            # prompt-only data is fine when a generate stage lets the teacher write the responses
            need = not any(st.type == "generate" for st in self.recipe.stages)
            train = data.load_instructions(d.train, require_output=need)
            if d.valid:
                valid = data.load_instructions(d.valid, require_output=need)
            elif d.valid_size:
                train, valid = train[d.valid_size:], train[: d.valid_size]
            else:
                valid = []
            if d.max_examples:
                train = train[: d.max_examples]
            if d.max_valid_examples:
                valid = valid[: d.max_valid_examples]
            return {"train": train, "valid": valid}

        return self.cached("instructions", load)[split]

    def set_instructions(self, split: str, examples: list) -> None:
        """Replace a split's examples for the stages that follow (e.g. with teacher responses)."""
        self.instructions(split)  # load the other split first
        self._cache["instructions"][split] = examples
        for key in [k for k in self._cache if k.startswith(("sft_rows/", "seqkd_prompts/"))]:
            del self._cache[key]

    def set_corpus_texts(self, texts: list[str]) -> None:
        """Use these documents as the plain-text corpus for the stages that follow."""
        self._corpus_texts = list(texts)
        self._cache.pop("corpus", None)

    def corpus(self):
        """(train_blocks, valid_blocks) packed from data.corpus (or texts a stage provided)."""
        from . import data

        d = self.recipe.data

        def load():
            texts = getattr(self, "_corpus_texts", None)
            if texts is None:
                if not d.corpus:
                    raise UserError("recipe.data.corpus: this stage needs plain text (PD, or MiniLLM's L_PT with lm_coef > 0): "
                                    "list text files, or add a generate stage with corpus: true")
                texts = data.load_texts(d.corpus)
            blocks = data.pack_blocks(texts, self.tokenizer, d.block_len)
            if d.valid_blocks:
                if d.valid_blocks >= len(blocks):
                    raise UserError(f"recipe.data.valid_blocks: {d.valid_blocks} held-out blocks leave no training text (the corpus packs into {len(blocks)} blocks of {d.block_len} tokens)")
                train, valid = data.split_blocks(blocks, n_valid=d.valid_blocks, seed=self.recipe.seed)
            else:
                train, valid = blocks, blocks[:0]
            if d.max_blocks:
                train = train[: d.max_blocks]
            if len(train) == 0:
                raise UserError(f"recipe.data.corpus: no training blocks left after holding out {d.valid_blocks} for validation")
            return train, valid

        return self.cached("corpus", load)


# ---- building models -------------------------------------------------------------------------


def load_teacher(run: Run) -> None:
    """Load the teacher in fp32 (a pruned student is copied from full-precision weights)."""
    r = run.recipe
    teacher, tok = models.load_model(r.teacher.model, gguf_file=r.teacher.gguf_file, dtype="fp32",
                                     device=run.device, trust_remote_code=r.teacher.trust_remote_code)
    run.teacher = models.freeze(teacher)
    run.tokenizer = tok


def build_student(run: Run):
    """The initial student; afterwards the teacher is cast to its run dtype."""
    s, r = run.recipe.student, run.recipe
    if s.init == "pretrained":
        student, tok = models.load_model(s.model, gguf_file=s.gguf_file, dtype="fp32", device=run.device,
                                         trust_remote_code=s.trust_remote_code)
        models.check_tokenizers_match(run.tokenizer, tok)
    elif s.init == "prune":
        n = len(models._decoder_layers(run.teacher))
        keep = s.keep_layers if s.keep_layers else models.stride_layers(n, s.layer_stride)
        student = models.prune_layers(run.teacher, keep)
    else:
        student = models.fresh_from_config(run.teacher, s.config_overrides, r.seed).to(run.device)
    run.teacher.to(models.DTYPES[r.teacher.dtype if r.teacher.dtype != "auto" else r.precision])
    student.requires_grad_(True)
    run.vocab_size = models.check_vocab(run.teacher, student, run.tokenizer)
    return student


def prepare_for_stage(run: Run, student):
    s = run.recipe.student
    if s.gradient_checkpointing:
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if s.lora.enabled:
            student.enable_input_require_grads()
    if s.lora.enabled:
        student = models.add_lora(student, s.lora)
    return student


# ---- the pipeline -----------------------------------------------------------------------------


RUN_CONTROL_KEYS = ("resume", "overwrite", "tensorboard", "threads", "device")


def _identity(resolved_yaml: str) -> dict:
    """What makes two recipes 'the same run' (everything but how this invocation runs it)."""
    import yaml

    d = yaml.safe_load(resolved_yaml) or {}
    return {k: v for k, v in d.items() if k not in RUN_CONTROL_KEYS}


def _leftover(p: Path) -> bool:
    """A file this function itself writes, left by a run killed before recipe.yaml was in place."""
    return p.name == ".write-test" or p.name.startswith(".tmp-recipe.yaml")


def prepare_output_dir(recipe: RecipeConfig, resolved: str) -> None:
    out = Path(recipe.output_dir)
    saved = out / "recipe.yaml"
    if out.exists() and not out.is_dir():
        raise UserError(f"recipe.output_dir: '{out}' exists and is not a folder")
    if saved.is_file():
        same = _identity(saved.read_text()) == _identity(resolved)
        if recipe.overwrite:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif recipe.resume == "auto":
            if not same:
                raise UserError(f"recipe.output_dir: '{out}' holds a run of a different recipe; resume needs the same recipe (or set overwrite=true)")
        else:
            raise UserError(f"recipe.output_dir: '{out}' already holds a run; set resume=auto to continue it or overwrite=true to replace it")
    elif recipe.resume == "auto" and out.is_dir() and any(not _leftover(p) for p in out.iterdir()):
        raise UserError(f"recipe.output_dir: '{out}' has files but no recipe.yaml of a minidistill run; refusing to resume into it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"recipe.output_dir: '{out}' is not writable ({e.strerror})") from None
    ckpt.write_text_atomic(saved, resolved)


def run_recipe(recipe: RecipeConfig) -> dict:
    """Run every stage; returns {stage name: final folder} (raises UserError on bad input)."""
    from accelerate.utils import set_seed

    resolved = dump_yaml(recipe)
    run = Run(recipe)
    if run.accelerator.is_main_process:
        prepare_output_dir(recipe, resolved)
    run.accelerator.wait_for_everyone()
    load_teacher(run)
    student = build_student(run)
    console.print(f"teacher {models.n_params(run.teacher) / 1e6:.1f}M params, student {models.n_params(student) / 1e6:.1f}M params, device {run.device}")
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
        module = stage_module(cfg.type)
        if not getattr(module, "TRAINS", True):  # generate / evaluate: no student update, no final/
            module.run(run, cfg, student)
            continue
        student = prepare_for_stage(run, student)
        result = module.run(run, cfg, student)
        if result.stopped:
            raise StoppedBySignal(f"stage '{cfg.name}' stopped at step {result.step}, checkpoint {result.checkpoint}; "
                                  "run again with resume=auto to continue")
        if run.accelerator.is_main_process:
            ckpt.export_hf(result.model, run.tokenizer, final)
        run.accelerator.wait_for_everyone()
        student = result.model.merge_and_unload() if models.is_peft(result.model) else result.model
        if getattr(student, "is_activation_checkpointing", False):
            (getattr(student, "activation_checkpointing_disable", None) or student.gradient_checkpointing_disable)()
        finals[cfg.name] = final
        console.print(f"stage '{cfg.name}' done: {final}")
    run.metrics.close()
    if run.accelerator.is_main_process:
        try:
            from .report import write_report

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

"""Run a recipe: ``python -m minidistill.run RECIPE.yaml [dotted.key=value ...] [--dry-run]``.

From Python: ``minidistill.run.main(["recipe.yaml", "seed=1"])`` (returns the exit code) or
``run_recipe(recipe)`` with a ``RecipeConfig``.

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
import os
import shutil
import sys
import time
from functools import cached_property
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import models
from .config import RecipeConfig, dump_yaml, load_recipe
from .errors import UserError
from .stages import stage
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
        cpu = use_cpu(recipe.device)
        self.precision = models.resolve_precision(recipe.precision, _device_type(recipe.device, cpu))
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.precision]
        self.accelerator = Accelerator(mixed_precision=mp, cpu=cpu)
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        set_seed(recipe.seed)
        self.out_dir = Path(recipe.output_dir)
        self.metrics = Metrics(self.out_dir, enabled=self.accelerator.is_main_process, tensorboard=recipe.tensorboard)
        console.quiet = not self.accelerator.is_main_process  # one copy of the console lines, not one per process
        self.teacher = None
        self.tokenizer = None
        self.vocab_size = None
        self._cache: dict = {}

    @property
    def fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed ZeRO-3: every process holds only a shard of the student's weights."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.distributed_type == DistributedType.DEEPSPEED:
            return int(getattr(acc.state.deepspeed_plugin, "zero_stage", 0) or 0) == 3
        return self.fsdp

    def export(self, model, out: Path) -> None:
        """Write a Hugging Face folder of ``model`` (every process calls this; under FSDP the full
        weights are gathered first, then the main process writes)."""
        acc = self.accelerator
        state = None
        if self.sharded:  # DeepSpeed gathers through its engine, the prepared wrapper of ``model``
            prepared = next((m for m in acc._models if getattr(m, "module", None) is model), model)
            state = acc.get_state_dict(prepared)
        if acc.is_main_process:
            ckpt.export_hf(model, self.tokenizer, out, state_dict=state)
        acc.wait_for_everyone()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def stage_dir(self, name: str) -> Path:
        return self.out_dir / name

    def log(self, stage: str, step: int, values: dict) -> None:
        self.metrics.log(stage, step, values)

    def cached(self, key: str, make):
        """``make()`` once per run. Keys starting with ``instructions/`` hold data made from the
        instruction examples (tokenized rows, prompt ids): ``set_instructions`` drops them."""
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
            need = not any(stage(st.type).writes_responses for st in self.recipe.stages)
            train = _named("data.train", lambda: data.load_instructions(d.train, require_output=need))
            if d.valid:
                valid = _named("data.valid", lambda: data.load_instructions(d.valid, require_output=need))
            elif d.valid_size:
                if d.valid_size >= len(train):
                    raise UserError(f"recipe.data.valid_size: holding out {d.valid_size} examples leaves no training "
                                    f"examples ({d.train} has {len(train)}); lower it or set data.valid")
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
        for key in [k for k in self._cache if k.startswith("instructions/")]:  # data made from them
            del self._cache[key]

    def set_corpus_texts(self, texts: list[str], source: str = "generated text") -> None:
        """Use these documents as the plain-text corpus for the stages that follow (``source`` names them in errors)."""
        from .data import TextList

        self._corpus_texts = TextList(texts, [source])
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
                texts = _named("data.corpus", lambda: data.load_texts(d.corpus))
                blocks = _named("data.corpus", lambda: data.pack_blocks(texts, self.tokenizer, d.block_len))
            else:  # a stage's text names itself in errors
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


def _has_device_backend() -> bool:
    """A device accelerate can run a multi-process group on (CUDA, XPU, NPU, HPU, ...)."""
    import accelerate.utils as au

    names = ("is_xpu_available", "is_npu_available", "is_mlu_available", "is_hpu_available", "is_musa_available",
             "is_sdaa_available", "is_neuron_available")
    return torch.cuda.is_available() or any(getattr(au, n, lambda: False)() for n in names)


def _device_type(device: str, cpu: bool) -> str:
    """The device type a run will train on, before accelerate is built (for ``precision: auto``)."""
    if cpu or device == "cpu":
        return "cpu"
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        # accelerate also picks XPU, NPU, MPS, ...: not the CPU, whose bf16 support says nothing there
        other = _has_device_backend() or torch.backends.mps.is_available()
        return "accelerator" if other else "cpu"
    return device.split(":")[0]


def use_cpu(device: str) -> bool:
    """Whether to hand accelerate ``cpu=True``.

    ``device: auto`` under a multi-process launcher (torchrun, ``accelerate launch --multi_gpu``)
    on a machine without GPUs: accelerate 1.x builds a process group only for a GPU-like device
    unless told ``cpu=True``, so every process would silently train alone. Use CPU + gloo.
    """
    if device == "cpu":
        return True
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) >= 0
    return device == "auto" and distributed and not _has_device_backend()


# ---- accelerate launch --cpu ------------------------------------------------------------------

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _accelerate_launch_argv(cmdline: list[str]) -> list[str] | None:
    """The arguments after ``accelerate launch`` in a command line, or None if it is not one."""
    for i, tok in enumerate(cmdline):
        base = Path(tok).name
        if base in ("accelerate-launch", "accelerate.commands.launch"):
            return cmdline[i + 1:]
        if base in ("accelerate", "accelerate.commands.accelerate_cli") and cmdline[i + 1:i + 2] == ["launch"]:
            return cmdline[i + 2:]
    return None


def accelerate_cpu_processes(env=None, parent_cmdline: list[str] | None = None) -> int:
    """How many processes ``accelerate launch --cpu`` was asked for when it started only this one.

    accelerate 1.x sends ``--cpu`` (and ``distributed_type: MULTI_CPU`` configs) through its
    "simple launcher": ONE Python process, with MASTER_ADDR/MASTER_PORT set when more were
    asked for, and the other processes left to ``mpirun`` (``--mpirun_hostfile``). Without
    mpirun the job silently runs as a single process. Recognised here by accelerate's variables
    without any rank variables; the count comes from the parent ``accelerate launch`` command
    line, resolved by accelerate's own parser (config file included). Returns 1 otherwise.
    """
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes") or "MASTER_ADDR" not in env:
        return 1
    if any(k in env for k in RANK_VARS):
        return 1
    try:
        if parent_cmdline is None:
            import psutil

            parent_cmdline = psutil.Process(os.getppid()).cmdline()
        argv = _accelerate_launch_argv(parent_cmdline)
        if argv is None:
            return 1
        import logging

        from accelerate.commands.launch import _validate_launch_command, launch_command_parser

        launch_log = logging.getLogger("accelerate.commands.launch")
        level = launch_log.level
        launch_log.setLevel(logging.ERROR)  # the parent already printed its warnings
        try:
            args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
        finally:
            launch_log.setLevel(level)
    except (Exception, SystemExit):
        return 1
    if getattr(args, "mpirun_hostfile", None) or (args.num_machines or 1) > 1:
        return 1
    return max(1, int(args.num_processes or 1))


def relaunch_cpu_workers(n: int, argv: list[str]) -> int:
    """Run ``python -m minidistill.run argv`` as ``n`` local CPU processes (torchrun's agent)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    console.print(f"accelerate launch --cpu started one process for {n}: starting {n} gloo workers")
    args = torchrun.get_args_parser().parse_args([
        "--nnodes", "1", "--nproc_per_node", str(n), "--master_addr", os.environ["MASTER_ADDR"],
        "--master_port", os.environ.get("MASTER_PORT", "29500"), "--module", "minidistill.run", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0


# ---- building models -------------------------------------------------------------------------


def _named(key: str, load):
    """Call ``load()``; a UserError from it is prefixed with the recipe key that named the input."""
    try:
        return load()
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def load_teacher(run: Run) -> None:
    """Load the teacher in fp32 (a pruned student is copied from full-precision weights).
    Under FSDP it stays on the CPU until ``shard_teacher`` moves each process's shard over."""
    r = run.recipe
    teacher, tok = _named("teacher.model", lambda: models.load_model(
        r.teacher.model, gguf_file=r.teacher.gguf_file, dtype="fp32", device="cpu" if run.fsdp else run.device,
        trust_remote_code=r.teacher.trust_remote_code))
    run.teacher = models.freeze(teacher)
    run.tokenizer = tok


def build_student(run: Run):
    """The initial student; afterwards the teacher is cast to its run dtype."""
    s, r = run.recipe.student, run.recipe
    if s.init == "pretrained":
        student, tok = _named("student.model", lambda: models.load_model(
            s.model, gguf_file=s.gguf_file, dtype="fp32", device=run.device, trust_remote_code=s.trust_remote_code))
        models.check_tokenizers_match(run.tokenizer, tok)
    elif s.init == "prune":
        n = len(models._decoder_layers(run.teacher))
        keep = s.keep_layers if s.keep_layers else models.stride_layers(n, s.layer_stride)
        student = models.prune_layers(run.teacher, keep)
    else:
        student = models.fresh_from_config(run.teacher, s.config_overrides, r.seed).to(run.device)
    run.teacher.to(models.DTYPES[r.teacher.dtype if r.teacher.dtype != "auto" else run.precision])
    student.requires_grad_(True)
    run.vocab_size = models.check_vocab(run.teacher, student, run.tokenizer)
    return student


def shard_teacher(run: Run) -> None:
    """Under FSDP, shard the frozen teacher like the student: one FSDP unit per decoder layer
    (accelerate's auto-wrap policy from the accelerate config), gathered layer by layer in each
    forward, so a teacher that does not fit on one GPU still runs. DDP and DeepSpeed ZeRO-2/3
    keep a full teacher replica on every process. With sharded weights (FSDP, ZeRO-3) stages
    that generate text are refused: every process would have to decode in step."""
    if not run.sharded:
        return
    gen = [st.name for st in run.recipe.stages if stage(st.type).generates]
    if gen:
        raise UserError(f"recipe.stages: {', '.join(gen)} generate text, which is not supported with sharded weights "
                        "(FSDP, DeepSpeed ZeRO-3) yet: every process would have to decode in step; launch these "
                        "stages with DDP (recipes/accelerate/ddp.yaml) or DeepSpeed ZeRO-2")
    if not run.fsdp:
        return
    acc = run.accelerator
    plugin = acc.state.fsdp_plugin
    if plugin.fsdp_version == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        run.teacher = fsdp2_prepare_model(acc, run.teacher)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        plugin.set_auto_wrap_policy(run.teacher)
        run.teacher = FSDP(run.teacher, sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
                           cpu_offload=plugin.cpu_offload, auto_wrap_policy=plugin.auto_wrap_policy,
                           mixed_precision=plugin.mixed_precision_policy, use_orig_params=True,
                           limit_all_gathers=plugin.limit_all_gathers, device_id=acc.device)
    run.teacher.eval()


def preflight(run: Run, student) -> None:
    """Read and check, before anything is written, what the stages will read: LoRA targets, the
    instruction data (parsed, and its prompts fit max_prompt_length), the corpus (packs into blocks)
    and each stage's own inputs (``Stage.preflight``, e.g. logit stores given by path). Data a stage
    produces (generate) is checked when it exists."""
    from . import data

    r, d = run.recipe, run.recipe.data
    if r.student.lora.enabled:
        models.check_lora_targets(student, r.student.lora)
    if any(stage(s.type).needs_instructions for s in r.stages):
        for split in ("train", "valid"):
            examples = run.instructions(split)
            if examples:
                data.tokenize_prompts(examples, run.tokenizer, template=d.template,
                                      max_prompt_length=d.max_prompt_length, long_prompt=d.long_prompt)
    for s in r.stages:
        st = stage(s.type)
        if st.provides_corpus(s):
            break  # later stages read the generated text, not data.corpus
        if st.needs_corpus(s):
            run.corpus()
        if st.preflight is not None:
            st.preflight(run, s)


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
    """A file prepare_output_dir itself writes, left by a run killed before recipe.yaml was in place."""
    return p.name == ".write-test" or p.name.startswith(".tmp-recipe.yaml")


def check_output_dir(recipe: RecipeConfig, resolved: str) -> None:
    """Refuse an output_dir this run must not or cannot write to; reads only, writes nothing."""
    out = Path(recipe.output_dir)
    saved = out / "recipe.yaml"
    if out.exists() and not out.is_dir():
        raise UserError(f"recipe.output_dir: '{out}' exists and is not a folder")
    if saved.is_file():
        same = _identity(saved.read_text()) == _identity(resolved)
        if recipe.overwrite:
            pass
        elif recipe.resume == "auto":
            if not same:
                raise UserError(f"recipe.output_dir: '{out}' holds a run of a different recipe; resume needs the same recipe (or set overwrite=true)")
        else:
            raise UserError(f"recipe.output_dir: '{out}' already holds a run; set resume=auto to continue it or overwrite=true to replace it")
    elif out.is_dir() and any(not _leftover(p) for p in out.iterdir()):
        raise UserError(f"recipe.output_dir: '{out}' is not empty and holds no minidistill run (no recipe.yaml); "
                        "use a new or empty folder")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"recipe.output_dir: '{parent}' is not a folder, so '{out}' cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"recipe.output_dir: '{out}' is not writable (no write permission on '{parent}')")


def prepare_output_dir(recipe: RecipeConfig, resolved: str) -> None:
    """Check output_dir again, clear it for overwrite, create it and write recipe.yaml."""
    check_output_dir(recipe, resolved)
    out = Path(recipe.output_dir)
    saved = out / "recipe.yaml"
    if saved.is_file() and recipe.overwrite:
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif recipe.resume == "auto" and not saved.is_file():
        console.print(f"resume=auto: no earlier run in '{out}', starting from scratch")
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
    check_output_dir(recipe, resolved)  # read-only; nothing is written until every input has been checked
    run = Run(recipe)
    load_teacher(run)
    student = build_student(run)
    shard_teacher(run)
    preflight(run, student)
    if run.accelerator.is_main_process:
        prepare_output_dir(recipe, resolved)
    run.accelerator.wait_for_everyone()
    console.print(f"teacher {models.n_params(run.teacher) / 1e6:.1f}M params, student {models.n_params(student) / 1e6:.1f}M params, device {run.device}, "
                  f"precision {run.precision}{' (auto)' if run.recipe.precision == 'auto' else ''}")
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
            raise StoppedBySignal(f"stage '{cfg.name}' stopped at step {result.step}, checkpoint {result.checkpoint}; "
                                  "run again with resume=auto to continue")
        run.export(result.model, final)
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

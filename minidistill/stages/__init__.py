"""Stages: one module per method (sft, kd, seqkd, pd, pd_store, minillm, generate, evaluate).

Each module defines ``Config`` (a dataclass; training stages extend ``config.TrainConfig``),
``run(run, cfg, student)`` and, at its end, ``STAGE = Stage(...)``: everything the recipe parser
(config.py), the pipeline (run.py) and the report need to know about the type. ``TYPES`` lists the
types (in the order the docs show them); ``stage(kind)`` imports a type's module on first use, so
importing this package loads no stage (config.py and report.py stay light and free of cycles).

Adding a stage: write ``stages/<type>.py`` ending in ``STAGE = Stage(...)`` and add the type to
``TYPES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Plot:
    """One report figure of a stage: several metric keys on one y axis."""

    name: str
    keys: list[str]
    title: str
    ylabel: str
    logy: bool = False
    smooth: bool = True  # False for deterministic schedules (lr, alpha)


LOSS_PLOTS = (  # the report's figures for a stage that declares none (and for unknown types)
    Plot("loss", ["loss", "valid/loss", "valid/total", "valid/kd"], "Loss", "nats/token"),
    Plot("valid_ppl", ["valid/ppl"], "Validation perplexity", "perplexity (log scale)", logy=True),
)


def never(cfg: Any) -> bool:
    return False


def always(cfg: Any) -> bool:
    return True


def served_ok(cfg: Any, logprobs: int) -> str:
    """``Stage.served_teacher`` of a stage that asks a served teacher for nothing it cannot give."""
    return ""


def teacher_free(cfg: Any) -> tuple[str, str]:
    """``Stage.cross_tokenizer`` of a stage that never compares teacher and student token by token."""
    return "", ""


@dataclass(frozen=True)
class Stage:
    """What the rest of minidistill knows about a stage type."""

    type: str
    config: type  # the recipe dataclass of the stage's settings
    run: Callable  # run(run, cfg, student): a LoopResult when it trains, else ignored
    # False: no LoRA/gradient checkpointing set-up, no final/ export, the student passes through
    # unchanged, and the stage runs again on resume
    trains: bool = True
    generates: bool = False  # decodes text (refused with sharded weights: FSDP, ZeRO-3)
    needs_instructions: bool = False  # reads data.train/valid (parsed and checked before anything is written)
    writes_responses: bool = False  # replaces the references with teacher responses: prompt-only data is enough
    needs_corpus: Callable[[Any], bool] = never  # needs_corpus(cfg): reads the plain-text corpus
    # provides_corpus(cfg): later stages read text this stage writes, not data.corpus (not preflighted)
    provides_corpus: Callable[[Any], bool] = never
    # preflight(run, cfg): check what this stage reads (beyond instructions and corpus) before anything is written
    preflight: Callable | None = None
    # check_in_recipe(recipe, index, where): checks that need the other stages of the recipe
    check_in_recipe: Callable | None = None
    plots: tuple[Plot, ...] = LOSS_PLOTS  # the report's training-curve figures
    # cross_tokenizer(cfg) -> (mode, problem): what the stage, as configured, asks of a teacher with
    # another tokenizer ("token": a loss over character spans, a uld kind or MiniLLM
    # cross_tokenizer: true; "text": teacher-written text; "": nothing), and why it cannot run with
    # one ('' when it can); ``teacher.check_stages`` asks every stage before anything is written
    cross_tokenizer: Callable[[Any], tuple[str, str]] = teacher_free
    # served_teacher(cfg, logprobs) -> why the stage, as configured, cannot run with a teacher behind
    # a server that gives ``logprobs`` alternatives per position ('' when it can);
    # ``teacher.served.check_stages`` asks every stage before anything is loaded
    served_teacher: Callable[[Any, int], str] = served_ok


TYPES = ("sft", "kd", "seqkd", "pd", "pd_store", "minillm", "generate", "evaluate")


def stage(kind: str) -> Stage:
    """The ``Stage`` of type ``kind`` (one of ``TYPES``; imports its module on first use)."""
    if kind not in TYPES:
        raise KeyError(f"unknown stage type {kind!r}")
    return importlib.import_module(f"{__name__}.{kind}").STAGE

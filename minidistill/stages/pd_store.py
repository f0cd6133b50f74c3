"""pd_store: one teacher pass over the corpus train blocks, writing offline PD logits (trains nothing).

The store goes into this stage's folder (``<output_dir>/<name>/``; format in
``minidistill.logit_store``): per token the top-p-k teacher distribution as ``top_k`` slots of
uint16/uint32 ids + float16 log-probs at tau = 1. A later ``pd`` stage with
``teacher_logits: offline`` reads it (by default from the closest pd_store stage before it) and
must use the same ``top_p`` and ``top_k``.

Resuming: a complete store with the same identity is reused (checked, not recomputed); an
interrupted build continues from its complete shards (``on_partial: continue``) or starts over
(``on_partial: rebuild``). Shards are written to temporary names and renamed, ``header.json`` last.

The stage trains nothing (``trains=False`` in ``STAGE``, like generate/evaluate): the student
passes through unchanged, no ``final/`` is exported, and the stage runs again on resume, which only
re-checks the finished store. ``run`` still returns a ``LoopResult`` (step 0, best None) for direct callers.
Unlike training stages this Config has no optimizer settings (a typo'd ``lr`` here is an error).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from minidistill import data
from minidistill.config import opt
from minidistill.models import logit_store
from minidistill.reporting.tracking import console
from minidistill.stages import Stage, always
from minidistill.training.loop import LoopResult


@dataclass
class Config:
    type: str = opt("", "Stage type.")
    name: str = opt("", "Stage name (folder under output_dir, which holds the store); defaults to the type.")
    top_p: float = opt(0.95, "Keep the smallest set of teacher tokens reaching this probability...", gt=0.0, max=1.0)
    top_k: int = opt(
        50, "...capped at this many tokens (record width: 4 * top_k bytes per token with uint16 ids).", min=1
    )
    batch_size: int = opt(8, "Blocks per teacher forward pass.", min=1)
    shard_blocks: int = opt(1024, "Blocks per shard (one .indices.npy + one .logprobs.npy file).", min=1)
    on_partial: Literal["continue", "rebuild"] = opt(
        "continue", "An interrupted build: keep its complete shards and continue, or delete them and start over."
    )


def store_identity(run, cfg, blocks) -> dict:
    return logit_store.identity(
        tokenizer_hash=logit_store.tokenizer_hash(run.tokenizer),
        vocab_size=run.vocab_size,
        block_len=blocks.shape[1],
        n_blocks=blocks.shape[0],
        corpus_fingerprint=data.corpus_fingerprint(blocks),
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        teacher=run.recipe.teacher.model,
    )


def run(run, cfg: Config, student):
    acc = run.accelerator
    blocks, _ = run.corpus()
    folder = run.stage_dir(cfg.name)
    ident = store_identity(run, cfg, blocks)
    V = run.vocab_size

    computed = [0]  # blocks the teacher ran on in this call (0: the finished store was reused)

    def logits_fn(ids):
        computed[0] += len(ids)
        return run.teacher.block_logits(ids.to(run.device), V)  # (b, T, V)

    bar = tqdm(total=len(blocks), desc=f"{cfg.name} (blocks)", disable=not acc.is_main_process, dynamic_ncols=True)
    t0 = time.perf_counter()
    header = logit_store.build_store(
        folder,
        blocks,
        logits_fn,
        ident,
        batch_size=cfg.batch_size,
        shard_blocks=cfg.shard_blocks,
        on_partial=cfg.on_partial,
        rank=acc.process_index,
        world=acc.num_processes,
        barrier=acc.wait_for_everyone,
        progress=bar.update,
        log=lambda m: console.print(m) if acc.is_main_process else None,
    )
    bar.close()
    dt = time.perf_counter() - t0
    computed[0] = int(acc.reduce(torch.tensor(computed[0], device=run.device), "sum"))  # over processes
    stats = header["stats"]
    values = {
        "store_seconds": dt,
        "bytes_per_token": stats["bytes_per_token"],
        "mean_kept": stats["mean_kept"],
        "mean_teacher_kept_mass": stats["mean_teacher_kept_mass"],
        "store_bytes": stats["bytes"],
        "computed_blocks": computed[0],
    }
    if computed[0]:
        values["store_tokens_per_s"] = computed[0] * header["positions_per_block"] / dt
    run.log(cfg.name, 0, values)
    if acc.is_main_process:
        console.print(
            f"logit store {folder}: {header['n_blocks']} blocks x {header['positions_per_block']} positions, "
            f"{stats['bytes'] / 1e6:.1f} MB, {stats['bytes_per_token']:.1f} bytes/token, "
            f"mean kept {stats['mean_kept']:.1f} of {cfg.top_k}, teacher kept mass {stats['mean_teacher_kept_mass']:.3f}"
        )
    return LoopResult(model=student, step=0, best=None, stopped=False)


def cross_tokenizer(cfg) -> tuple[str, str]:
    """``Stage.cross_tokenizer``: a store holds teacher distributions at the student's token positions."""
    return "", (
        "stores teacher distributions at the student's token positions, which a teacher with another "
        "tokenizer does not have: use a pd stage with teacher_logits: online and kd_kind: uld or uld_hybrid"
    )


def served_teacher(cfg, logprobs: int) -> str:
    """``Stage.served_teacher``: a store keeps the distribution at every position of a block."""
    return "pd_store keeps the teacher's distribution at every block position; use pd with teacher_logits: online"


STAGE = Stage(
    "pd_store",
    Config,
    run,
    trains=False,
    needs_corpus=always,
    cross_tokenizer=cross_tokenizer,
    served_teacher=served_teacher,
)

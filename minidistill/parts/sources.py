"""Data sources every stage draws from: the recipe's instruction data as token rows, examples and
prompts (cached on the run, dropped when a stage replaces the examples), and the resumable shuffled
micro-batch streams the loop reads (``batches.ShuffledBatches``) with their step counts."""

from __future__ import annotations

import math
from typing import Callable

from minidistill import data
from minidistill.training.batches import ShuffledBatches


def _tokenized(run, split: str):
    d = run.recipe.data
    return data.tokenize_sft(
        run.instructions(split),
        run.tokenizer,
        template=d.template,
        max_prompt_length=d.max_prompt_length,
        max_length=d.max_length,
        long_prompt=d.long_prompt,
    )


def instruction_rows(run, split: str) -> list[dict]:
    """Tokenized (input_ids, labels, prompt_length) rows of the recipe's instruction data, cached per run."""
    if split == "valid" and not run.instructions("valid"):
        return []
    return run.cached(f"instructions/sft_rows/{split}", lambda: _tokenized(run, split)[0])


def instruction_examples(run, split: str) -> list:
    """The examples behind ``instruction_rows(run, split)``, row for row."""

    def make():
        examples = run.instructions(split)
        return [examples[i] for i in _tokenized(run, split)[1].kept_indices]

    if split == "valid" and not run.instructions("valid"):
        return []
    return run.cached(f"instructions/sft_examples/{split}", make)


def prompts(run, split: str = "train", teacher: bool = False) -> tuple[list[list[int]], list[int]]:
    """Prompt ids of a split's examples (as ``data.tokenize_prompts`` keeps them) and their example
    indices, cached per run; ``teacher``: in the teacher's tokenizer and rendering (the same as the
    student's unless they differ)."""
    d = run.recipe.data
    tok = run.teacher.tokenizer if teacher else run.tokenizer

    def make():
        ids, _, stats = data.tokenize_prompts(
            run.instructions(split),
            tok,
            template=d.template,
            max_prompt_length=d.max_prompt_length,
            long_prompt=d.long_prompt,
        )
        return ids, list(stats.kept_indices)

    other = "teacher_" if tok is not run.tokenizer else ""
    return run.cached(f"instructions/seqkd_{other}prompts/{split}", make)


def collate(rows: list[dict], pad_id: int, device) -> dict:
    """Right-padded instruction rows on ``device`` with their response-token count (``num_tokens``)."""
    batch = data.collate_sft(rows, pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["num_tokens"] = int((batch["labels"][:, 1:] != -100).sum())
    return batch


def shuffled(run, cfg, n: int, make: Callable[[list[int]], dict]) -> ShuffledBatches:
    """The stage's resumable stream of micro-batches ``make(indices)`` over ``n`` items: seeded by
    the recipe, sharded over processes, epochs ending at optimizer-step boundaries."""
    acc = run.accelerator
    return ShuffledBatches(
        n,
        cfg.batch_size,
        make,
        seed=run.recipe.seed,
        rank=acc.process_index,
        world=acc.num_processes,
        accum=cfg.grad_accum,
    )


def rows_source(run, cfg, rows: list[dict]) -> ShuffledBatches:
    """Micro-batches of instruction rows (``collate``)."""
    pad = run.tokenizer.pad_token_id
    return shuffled(run, cfg, len(rows), lambda idx: collate([rows[i] for i in idx], pad, run.device))


def total_steps(cfg, source: ShuffledBatches) -> int:
    """``max_steps``, else ``epochs`` over the source in optimizer steps."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * source.steps_per_epoch() / cfg.grad_accum))

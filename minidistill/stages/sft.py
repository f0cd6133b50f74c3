"""SFT: fine-tune the student on instruction data (loss on response tokens only).

Keeps the checkpoint with the lowest validation loss in ``<stage>/best/`` (the MiniLLM paper's
stage 1 picks that one) and the last one in ``<stage>/final/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import data
from ..batches import ShuffledBatches
from ..config import TrainConfig, opt
from ..logits import next_token_logits
from ..loop import train
from ..losses import lm_loss
from . import Stage


@dataclass
class Config(TrainConfig):
    lr: float = opt(5e-5, "Peak learning rate.", min=0.0)
    keep_best: bool = opt(True, "Also export the lowest-validation-loss model to <stage>/best/.")


def instruction_rows(run, split: str) -> list[dict]:
    """Tokenized (input_ids, labels) rows of the recipe's instruction data, cached per run."""
    d = run.recipe.data

    def make():
        rows, stats = data.tokenize_sft(
            run.instructions(split),
            run.tokenizer,
            template=d.template,
            max_prompt_length=d.max_prompt_length,
            max_length=d.max_length,
            long_prompt=d.long_prompt,
        )
        return rows

    if split == "valid" and not run.instructions("valid"):
        return []
    return run.cached(f"instructions/sft_rows/{split}", make)


def instruction_examples(run, split: str) -> list:
    """The examples behind ``instruction_rows(run, split)``, row for row."""

    def make():
        d = run.recipe.data
        _, stats = data.tokenize_sft(
            run.instructions(split),
            run.tokenizer,
            template=d.template,
            max_prompt_length=d.max_prompt_length,
            max_length=d.max_length,
            long_prompt=d.long_prompt,
        )
        examples = run.instructions(split)
        return [examples[i] for i in stats.kept_indices]

    if split == "valid" and not run.instructions("valid"):
        return []
    return run.cached(f"instructions/sft_examples/{split}", make)


def collate(rows: list[dict], pad_id: int, device) -> dict:
    batch = data.collate_sft(rows, pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["num_tokens"] = int((batch["labels"][:, 1:] != -100).sum())
    return batch


def source_for(run, cfg, rows: list[dict]) -> ShuffledBatches:
    acc = run.accelerator
    pad = run.tokenizer.pad_token_id
    return ShuffledBatches(
        len(rows),
        cfg.batch_size,
        lambda idx: collate([rows[i] for i in idx], pad, run.device),
        seed=run.recipe.seed,
        rank=acc.process_index,
        world=acc.num_processes,
        accum=cfg.grad_accum,
    )


def total_steps(cfg, source: ShuffledBatches) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * source.steps_per_epoch() / cfg.grad_accum))


def response_logits(model, batch) -> torch.Tensor:
    """(B, T-1, V): position t predicts token t+1 of the batch's input_ids (``logits.next_token_logits``)."""
    return next_token_logits(model, batch["input_ids"], batch["attention_mask"])


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy; ``labels`` aligned with ``logits``, -100 = ignored."""
    return lm_loss(logits, labels, labels != -100)[0]


def sft_loss(model, batch):
    logits = response_logits(model, batch)
    loss = ce_sum(logits, batch["labels"][:, 1:])
    return loss, {}


def make_evaluate(run, cfg, rows: list[dict], loss_fn=sft_loss):
    acc = run.accelerator
    pad = run.tokenizer.pad_token_id

    def evaluate(model) -> dict:
        mine = rows[acc.process_index :: acc.num_processes]
        total = torch.zeros((), device=run.device)
        tokens = torch.zeros((), device=run.device)
        for n, i in enumerate(range(0, len(mine), cfg.batch_size)):
            if cfg.eval_batches is not None and n >= cfg.eval_batches:
                break
            batch = collate(mine[i : i + cfg.batch_size], pad, run.device)
            with acc.autocast():
                total += loss_fn(model, batch)[0].float()
            tokens += batch["num_tokens"]
        total, tokens = acc.reduce(total, "sum"), acc.reduce(tokens, "sum")
        loss = float(total / tokens.clamp(min=1))
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    return evaluate


def run(run, cfg: Config, student):
    rows = instruction_rows(run, "train")
    valid = instruction_rows(run, "valid")
    source = source_for(run, cfg, rows)
    best_dir = run.stage_dir(cfg.name) / "best"

    def on_best(model):
        if cfg.keep_best:
            run.export(model, best_dir)

    return train(
        run,
        cfg,
        student,
        source,
        lambda model, batch, step: sft_loss(model, batch),
        total_steps(cfg, source),
        evaluate=make_evaluate(run, cfg, valid) if valid else None,
        best_key="loss",
        best_mode="min",
        on_best=on_best,
    )


STAGE = Stage("sft", Config, run, needs_instructions=True)

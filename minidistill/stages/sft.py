"""SFT: fine-tune the student on instruction data (loss on response tokens only).

Keeps the checkpoint with the lowest validation loss in ``<stage>/best/`` (the MiniLLM paper's
stage 1 picks that one) and the last one in ``<stage>/final/``.
"""

from __future__ import annotations

from dataclasses import dataclass

from minidistill.config import TrainConfig, opt
from minidistill.parts import sources, validation
from minidistill.parts.objectives import ce_sum, next_logits
from minidistill.stages import Stage
from minidistill.training.loop import train


@dataclass
class Config(TrainConfig):
    lr: float = opt(5e-5, "Peak learning rate.", min=0.0)
    keep_best: bool = opt(True, "Also export the lowest-validation-loss model to <stage>/best/.")


def sft_loss(model, batch):
    return ce_sum(next_logits(model, batch), batch["labels"][:, 1:]), {}


def make_evaluate(run, cfg, rows: list[dict]):
    """Gold CE per response token on the validation rows: {loss, ppl}."""
    pad = run.tokenizer.pad_token_id
    return validation.held_out(
        run,
        cfg,
        rows,
        ("loss", "tokens"),
        lambda part, start: sources.collate(part, pad, run.device),
        lambda model, batch, start: {"loss": sft_loss(model, batch)[0], "tokens": batch["num_tokens"]},
        lambda t: validation.loss_and_ppl(validation.per_token(t["loss"], t["tokens"])),
    )


def run(run, cfg: Config, student):
    valid = sources.instruction_rows(run, "valid")
    source = sources.rows_source(run, cfg, sources.instruction_rows(run, "train"))
    return train(
        run,
        cfg,
        student,
        source,
        lambda model, batch, step: sft_loss(model, batch),
        sources.total_steps(cfg, source),
        evaluate=make_evaluate(run, cfg, valid) if valid else None,
        best_by=("loss", "min"),
    )


STAGE = Stage("sft", Config, run, needs_instructions=True)

"""KD: word-level knowledge distillation on the gold responses (the MiniLLM paper's "KD" baseline).

Teacher-forced on the instruction data: student and teacher see the same ``input_ids`` (prompt +
gold response + EOS); at every response position

    loss = (1 - kd_ratio) * CE(gold token) + kd_ratio * D(teacher || student)

summed over response tokens (the loop divides by the global token count). The MiniLLM baseline is
kd_ratio 0.5, temperature 1 and D = -sum_v p(v) log q(v) (soft cross-entropy; the official code's
``get_distil_loss``). The default ``kind`` here is ``fkl`` = that minus the teacher entropy: the
same gradient, but 0 when the student matches the teacher; ``kind: ce`` logs the official value.
Distributions are compared over the first ``run.vocab_size`` logits (heads padded beyond the
tokenizer are ignored); the CE term uses the student's whole head, exactly as SFT does.

Validation: CE on the gold validation responses (the SFT validation loss, ``valid/loss``, which
picks ``<stage>/best``), plus the divergence to the teacher (``valid/kd``) and the training mix
(``valid/total``) when kd_ratio > 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import TrainConfig, opt
from ..logits import next_token_logits
from ..loop import train
from ..losses import ce_and_divergence
from . import Stage
from .sft import ce_sum, instruction_rows, make_evaluate, response_logits, source_for, total_steps


@dataclass
class Config(TrainConfig):
    lr: float = opt(5e-5, "Peak learning rate.", min=0.0)
    kd_ratio: float = opt(
        0.5,
        "Weight of the distillation term; (1 - kd_ratio) weighs the gold CE "
        "(MiniLLM baselines: 0.5; 0 = plain SFT, teacher unused).",
        min=0.0,
        max=1.0,
    )
    kind: Literal["fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tv", "ce", "mse"] = opt(
        "fkl",
        "Token-level divergence (losses.token_divergence): fkl = KL(teacher||student) as the "
        "paper's KD; ce = soft cross-entropy (same gradient, the official code's logged value).",
    )
    temperature: float = opt(1.0, "Teacher softmax temperature (paper: 1).", gt=0.0)
    student_temperature: bool = opt(
        False,
        "Also divide the student's logits by `temperature` and scale the "
        "divergence by temperature**2 (Hinton-style); off: only the teacher is tempered.",
    )
    skew: float = opt(0.1, "kind skew_fkl / skew_rkl: DistiLLM's mixing weight.", min=0.0, max=1.0)
    beta: float = opt(0.5, "kind jsd: generalized JSD beta (TRL convention).", min=0.0, max=1.0)
    keep_best: bool = opt(True, "Also export the lowest-validation-loss (gold CE) model to <stage>/best/.")


def kd_terms(
    model, teacher, batch: dict, cfg, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CE sum over response tokens, divergence sum over them or None when kd_ratio == 0).

    The teacher runs under no_grad on the same input_ids/attention_mask; CE (over the student's
    whole head) and divergence (over the first ``vocab_size`` logits) come from one
    ``losses.ce_and_divergence`` pass. With kd_ratio == 1 the CE is detached (logged only).
    """
    logits = response_logits(model, batch)  # (B, T-1, Vs)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    if cfg.kd_ratio == 0:
        return ce_sum(logits, labels), None
    with torch.no_grad():
        t_logits = next_token_logits(teacher, batch["input_ids"], batch["attention_mask"])  # (B, T-1, Vt)
    v = vocab_size if vocab_size is not None else min(logits.shape[-1], t_logits.shape[-1])
    r = ce_and_divergence(
        logits,
        t_logits,
        labels,
        labels != -100,
        cfg.kind,
        vocab=v,
        temperature=cfg.temperature,
        student_temperature=cfg.student_temperature,
        skew=cfg.skew,
        beta=cfg.beta,
    )
    return (r.ce if cfg.kd_ratio < 1 else r.ce.detach()), r.divergence


def kd_loss(model, teacher, batch: dict, cfg, vocab_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """The summed KD loss of one batch and per-token metrics {ce, kd}."""
    ce, kd = kd_terms(model, teacher, batch, cfg, vocab_size)
    n = max(float(batch["num_tokens"]), 1.0)
    if kd is None:
        return ce, {"ce": float(ce.detach()) / n}
    r = cfg.kd_ratio
    loss = kd if r == 1 else (1 - r) * ce + r * kd
    return loss, {"ce": float(ce.detach()) / n, "kd": float(kd.detach()) / n}


def make_loss_fn(run, cfg):
    return lambda model, batch, step: kd_loss(model, run.teacher, batch, cfg, run.vocab_size)


def make_kd_evaluate(run, cfg, rows: list[dict]):
    """sft.make_evaluate (gold CE -> loss, ppl) plus ``kd`` and ``total`` per token in the same pass."""
    if cfg.kd_ratio == 0:
        return make_evaluate(run, cfg, rows)
    acc = run.accelerator
    side: dict = {}

    def ce_and_kd(model, batch):
        ce, kd = kd_terms(model, run.teacher, batch, cfg, run.vocab_size)
        side["kd"] += kd.float()
        side["tokens"] += batch["num_tokens"]
        return ce, {}

    base = make_evaluate(run, cfg, rows, loss_fn=ce_and_kd)

    def evaluate(model) -> dict:
        side["kd"] = torch.zeros((), device=run.device)
        side["tokens"] = torch.zeros((), device=run.device)
        values = base(model)
        kd_total, tokens = acc.reduce(side["kd"], "sum"), acc.reduce(side["tokens"], "sum")
        values["kd"] = float(kd_total / tokens.clamp(min=1))
        values["total"] = (1 - cfg.kd_ratio) * values["loss"] + cfg.kd_ratio * values["kd"]
        return values

    return evaluate


def train_on_rows(run, cfg, student, rows: list[dict], valid: list[dict]):
    """The KD loop over tokenized (input_ids, labels) rows; best by gold validation CE."""
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
        make_loss_fn(run, cfg),
        total_steps(cfg, source),
        evaluate=make_kd_evaluate(run, cfg, valid) if valid else None,
        best_key="loss",
        best_mode="min",
        on_best=on_best,
    )


def run(run, cfg: Config, student):
    return train_on_rows(run, cfg, student, instruction_rows(run, "train"), instruction_rows(run, "valid"))


STAGE = Stage("kd", Config, run, needs_instructions=True)

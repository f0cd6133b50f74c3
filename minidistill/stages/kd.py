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

Across tokenizers (``kind: uld`` or ``uld_hybrid``, ``minidistill.xtok``): the teacher sees its
own rendering of the prompt and its own tokenization of the same response text; the divergence
is taken at the paired positions (student and teacher tokens that start at the same character)
and averaged over them (the loss has two terms: CE per response token, the divergence per pair),
so ``kd`` is per pair and ``aligned`` is the share of response tokens that have a pair. The same
kinds work with one tokenizer (then every token pairs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .. import data, xtok
from ..batches import ShuffledBatches
from ..config import TrainConfig, opt
from ..logits import logits_at, next_token_logits
from ..loop import train
from ..losses import ce_and_divergence
from . import Stage
from .sft import (
    ce_sum,
    collate,
    instruction_examples,
    instruction_rows,
    make_evaluate,
    response_logits,
    source_for,
    total_steps,
)


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
    kind: Literal["fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tv", "ce", "mse", "uld", "uld_hybrid"] = opt(
        "fkl",
        "Token-level divergence (losses.token_divergence): fkl = KL(teacher||student) as the "
        "paper's KD; ce = soft cross-entropy (same gradient, the official code's logged value); "
        "uld / uld_hybrid: cross-tokenizer (minidistill.xtok): sorted-probability W1 at span-aligned "
        "positions / exact KL over the shared tokens + ULD over the rest (any teacher tokenizer).",
    )
    temperature: float = opt(1.0, "Teacher softmax temperature (paper: 1).", gt=0.0)
    student_temperature: bool = opt(
        False,
        "Also divide the student's logits by `temperature` and scale the "
        "divergence by temperature**2 (Hinton-style); off: only the teacher is tempered.",
    )
    skew: float = opt(0.1, "kind skew_fkl / skew_rkl: DistiLLM's mixing weight.", min=0.0, max=1.0)
    beta: float = opt(0.5, "kind jsd: generalized JSD beta (TRL convention).", min=0.0, max=1.0)
    uld_top_k: int = opt(
        0,
        "uld / uld_hybrid: compare the k largest probabilities of each side and the rest as one "
        "entry (0 = the full sorted vocabularies; 256 is near-exact and far cheaper on 262k-token vocabularies).",
        min=0,
    )
    uld_matched_weight: float = opt(1.0, "uld_hybrid: weight of the KL over the shared tokens.", min=0.0)
    uld_unmatched_weight: float = opt(1.0, "uld_hybrid: weight of the ULD over the unshared tokens.", min=0.0)
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


# ---- across tokenizers (kind uld / uld_hybrid) ------------------------------------------------


def cross_tokenizer(cfg) -> tuple[str, str]:
    """``Stage.cross_tokenizer``: kind uld/uld_hybrid asks for it; kd_ratio 0 never uses the teacher."""
    if cfg.kd_ratio == 0:
        return "", ""
    if cfg.kind in xtok.ULD_KINDS:
        return "token", ""
    return "", f"compares kind '{cfg.kind}' over one vocabulary: set kind: uld or uld_hybrid (or kd_ratio: 0)"


def uses_xtok(cfg) -> bool:
    return cfg.kd_ratio > 0 and cfg.kind in xtok.ULD_KINDS


def teacher_rows(run, rows: list[dict], examples: list) -> list[dict]:
    """``rows`` (student prompt + response ids) with the teacher's side: its own prompt rendering,
    its tokenization of the same response text, and the paired response positions."""
    d, ttok = run.recipe.data, run.teacher_tokenizer
    prefix = data.special_affixes(ttok)[0]
    out = []
    for row, ex in zip(rows, examples, strict=True):
        p = row["prompt_length"]
        view = run.xtok.teacher_view(row["input_ids"][p:])
        tp = data.encode_prompt(data.render_prompt(ex, d.template, ttok), ttok, prefix)
        out.append(
            {
                **row,
                "teacher_ids": tp + view.ids,
                "teacher_prompt_length": len(tp),
                "pairs": (view.student_pairs, view.teacher_pairs),
            }
        )
    return out


def collate_xtok(rows: list[dict], pad_id: int, teacher_pad_id: int, device) -> dict:
    """``sft.collate`` plus the right-padded teacher rows and the pairs as flat indices into the
    (B * (L-1)) next-token positions of each side; num_tokens {ce: response tokens, kd: pairs}."""
    batch = collate(rows, pad_id, device)
    width = max(len(r["teacher_ids"]) for r in rows)
    t_ids = torch.full((len(rows), width), teacher_pad_id, dtype=torch.long)
    t_mask = torch.zeros((len(rows), width), dtype=torch.long)
    ls, lt = batch["input_ids"].shape[1] - 1, width - 1
    s_flat, t_flat = [], []
    for b, r in enumerate(rows):
        t_ids[b, : len(r["teacher_ids"])] = torch.as_tensor(r["teacher_ids"])
        t_mask[b, : len(r["teacher_ids"])] = 1
        ps, pt = r["prompt_length"] - 1, r["teacher_prompt_length"] - 1
        si, ti = r["pairs"]
        s_flat += [b * ls + ps + i for i in si]
        t_flat += [b * lt + pt + j for j in ti]
    batch["teacher_ids"], batch["teacher_mask"] = t_ids.to(device), t_mask.to(device)
    batch["pairs_s"] = torch.tensor(s_flat, dtype=torch.long, device=device)
    batch["pairs_t"] = torch.tensor(t_flat, dtype=torch.long, device=device)
    batch["num_tokens"] = {"ce": batch["num_tokens"], "kd": len(s_flat)}
    return batch


def xtok_divergence(run, cfg, logits: torch.Tensor, batch: dict, kind: str | None = None) -> torch.Tensor:
    """Sum over the batch's pairs of the cross-tokenizer divergence (student logits (B, L-1, V))."""
    rows = logits.reshape(-1, logits.shape[-1])[batch["pairs_s"], : run.vocab_size]  # (M, Vs)
    teacher = logits_at(
        run.teacher, batch["teacher_ids"], batch["teacher_mask"], batch["pairs_t"], run.teacher_vocab_size
    )
    return xtok.divergence_sum(
        rows,
        teacher,
        kind or cfg.kind,
        shared=run.xtok.shared(),
        temperature=cfg.temperature,
        student_temperature=cfg.student_temperature,
        top_k=getattr(cfg, "uld_top_k", 0),
        matched_weight=getattr(cfg, "uld_matched_weight", 1.0),
        unmatched_weight=getattr(cfg, "uld_unmatched_weight", 1.0),
    )


def xtok_terms(run, model, batch: dict, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum over response tokens, divergence sum over pairs)."""
    logits = response_logits(model, batch)  # (B, L-1, Vs)
    ce = ce_sum(logits, batch["labels"][:, 1:])
    return ce, xtok_divergence(run, cfg, logits, batch)


def xtok_loss(run, model, batch: dict, cfg) -> tuple[dict, dict]:
    """Two terms the loop averages separately: (1 - kd_ratio) * CE per response token and
    kd_ratio * divergence per pair."""
    ce, kd = xtok_terms(run, model, batch, cfg)
    r = cfg.kd_ratio
    n, m = max(float(batch["num_tokens"]["ce"]), 1.0), max(float(batch["num_tokens"]["kd"]), 1.0)
    terms = {"ce": (1 - r) * (ce if r < 1 else ce.detach()), "kd": r * kd}
    return terms, {"ce": float(ce.detach()) / n, "kd": float(kd.detach()) / m, "aligned": m / n}


def make_xtok_evaluate(run, cfg, rows: list[dict]):
    """Gold CE per response token (loss, ppl), the divergence per pair (kd) and their mix (total)."""
    acc = run.accelerator
    pad, tpad = run.tokenizer.pad_token_id, _pad(run.teacher_tokenizer)

    def evaluate(model) -> dict:
        mine = rows[acc.process_index :: acc.num_processes]
        sums = torch.zeros(4, device=run.device)  # ce, kd, tokens, pairs
        for n, i in enumerate(range(0, len(mine), cfg.batch_size)):
            if cfg.eval_batches is not None and n >= cfg.eval_batches:
                break
            batch = collate_xtok(mine[i : i + cfg.batch_size], pad, tpad, run.device)
            with acc.autocast():
                ce, kd = xtok_terms(run, model, batch, cfg)
            sums += torch.stack(
                [ce.float(), kd.float(), *(torch.tensor(float(batch["num_tokens"][k])) for k in ("ce", "kd"))]
            ).to(run.device)
        ce, kd, tokens, n_pairs = acc.reduce(sums, "sum").tolist()
        loss, div = ce / max(tokens, 1.0), kd / max(n_pairs, 1.0)
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "kd": div,
            "total": (1 - cfg.kd_ratio) * loss + cfg.kd_ratio * div,
        }

    return evaluate


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def xtok_source(run, cfg, rows: list[dict]) -> ShuffledBatches:
    acc = run.accelerator
    pad, tpad = run.tokenizer.pad_token_id, _pad(run.teacher_tokenizer)
    return ShuffledBatches(
        len(rows),
        cfg.batch_size,
        lambda idx: collate_xtok([rows[i] for i in idx], pad, tpad, run.device),
        seed=run.recipe.seed,
        rank=acc.process_index,
        world=acc.num_processes,
        accum=cfg.grad_accum,
    )


# ---- the stage --------------------------------------------------------------------------------


def train_on_rows(
    run, cfg, student, rows: list[dict], valid: list[dict], examples: list | None = None, valid_examples=None
):
    """The KD loop over tokenized (input_ids, labels) rows; best by gold validation CE. A
    cross-tokenizer kind needs the examples behind the rows (the teacher renders its own prompt)."""
    best_dir = run.stage_dir(cfg.name) / "best"

    def on_best(model):
        if cfg.keep_best:
            run.export(model, best_dir)

    if uses_xtok(cfg):
        rows = teacher_rows(run, rows, examples)
        valid = teacher_rows(run, valid, valid_examples) if valid else []
        source = xtok_source(run, cfg, rows)
        loss_fn = lambda model, batch, step: xtok_loss(run, model, batch, cfg)  # noqa: E731
        evaluate = make_xtok_evaluate(run, cfg, valid) if valid else None
    else:
        source = source_for(run, cfg, rows)
        loss_fn = make_loss_fn(run, cfg)
        evaluate = make_kd_evaluate(run, cfg, valid) if valid else None
    return train(
        run,
        cfg,
        student,
        source,
        loss_fn,
        total_steps(cfg, source),
        evaluate=evaluate,
        best_key="loss",
        best_mode="min",
        on_best=on_best,
    )


def run(run, cfg: Config, student):
    examples = (
        (instruction_examples(run, "train"), instruction_examples(run, "valid")) if uses_xtok(cfg) else (None, None)
    )
    return train_on_rows(run, cfg, student, instruction_rows(run, "train"), instruction_rows(run, "valid"), *examples)


STAGE = Stage("kd", Config, run, needs_instructions=True, cross_tokenizer=cross_tokenizer)

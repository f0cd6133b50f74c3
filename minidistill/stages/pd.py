"""Pre-training distillation (PD, Peng et al. arXiv 2410.16215) on a packed plain-text corpus.

Per token: ``(1 - alpha) * CE(next token) + alpha * D(teacher target || student)`` (per-token means,
no tau**2 unless ``student_temperature``). The student keeps its full softmax; the teacher target
is ``softmax(Truncate_top_p_k(z) / tau)``: the smallest descending set reaching ``top_p``, capped at
``top_k`` tokens, renormalised, then tempered (``top_k: 0`` or null: the full teacher
distribution, online only). ``alpha`` follows ``alpha_schedule`` (``minidistill.schedules``), a pure
function of the optimizer step, so resume restores it exactly.

Teacher logits come ``online`` (a teacher forward under ``no_grad`` inside the loss; the loop's
autocast applies to both models; gradients reach only the student) or ``offline`` from a logit store
written by a ``pd_store`` stage (``minidistill.logit_store``): ``store`` names its folder, by default
the folder of the closest ``pd_store`` stage before this one. The store must match this run's
tokenizer, block length, corpus blocks, top_p and top_k, or the stage refuses it.

Logged per step: lm_loss, kd_loss, alpha, teacher_kept_mass (teacher probability inside the kept
set before renormalising), student_kept_mass (student probability on the kept set). Evaluation:
held-out perplexity of the student on the corpus's validation blocks (``data.valid_blocks``) and the
KD loss there (always against the live teacher: the store covers training blocks only). The
lowest-perplexity model goes to ``<stage>/best/``, the last to ``<stage>/final/``.

Across tokenizers (``kd_kind: uld`` or ``uld_hybrid``, online only; ``minidistill.xtok``): each
student block's text goes to the teacher in the teacher's own tokenization (documents cut at EOS,
the teacher's BOS in front); the KD term is taken at the paired positions (tokens of both sides
that start at the same character) against the truncated, renormalised, tempered teacher target
and averaged over the pairs (the LM term stays per student token). With ``top_k`` the sorted
comparison uses the k largest student probabilities and the rest as one entry, which is exact
against a target with at most k tokens. Logged: ``aligned`` (pairs per student position).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from minidistill import data
from minidistill.config import TrainConfig, opt
from minidistill.errors import UserError
from minidistill.functional import xtok
from minidistill.functional.losses import Truncated, lm_loss
from minidistill.models import logit_store
from minidistill.models.logit_store import LogitStore
from minidistill.models.logits import next_token_logits
from minidistill.parts import sources, validation
from minidistill.parts.objectives import ce_and_divergence, kept_mass, mix, pair_divergence
from minidistill.reporting.tracking import console
from minidistill.stages import Plot, Stage, always
from minidistill.teacher import StoredTeacher, as_teacher
from minidistill.teacher.served import truncated_problem
from minidistill.training.batches import ShuffledBatches
from minidistill.training.loop import train
from minidistill.training.schedules import alpha_at


@dataclass
class Config(TrainConfig):
    lr: float = opt(5e-4, "Peak learning rate (AdamW).", min=0.0)
    scheduler: Literal["constant", "cosine", "linear", "wsd"] = opt(
        "wsd", "LR schedule after warm-up (the PD paper's best: wsd, with alpha_schedule wsd)."
    )
    kd_kind: Literal["fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tv", "ce", "mse", "uld", "uld_hybrid"] = opt(
        "fkl",
        "Divergence (losses.token_divergence); with truncation not rkl/mse (infinite or undefined); "
        "uld / uld_hybrid: cross-tokenizer (minidistill.xtok; online only), any teacher tokenizer.",
    )
    top_p: float = opt(0.95, "Teacher truncation: keep the smallest set reaching this probability...", gt=0.0, max=1.0)
    top_k: int | None = opt(
        50,
        "...capped at this many tokens (0 or null: no truncation, top_p ignored: the full teacher distribution, online only).",
        min=0,
    )
    temperature: float = opt(1.0, "tau: teacher target softmax(truncated log-probs / tau).", gt=0.0)
    student_temperature: bool = opt(
        False, "Also divide the student logits by tau and scale the KD loss by tau**2 (Hinton)."
    )
    alpha: float = opt(0.9, "KD weight (the peak of a schedule): loss = (1-alpha)*LM + alpha*KD.", min=0.0, max=1.0)
    alpha_schedule: Literal["constant", "linear_increase", "linear_decrease", "wsd"] = opt(
        "constant",
        "constant | linear_increase (alpha_min->alpha) | linear_decrease (alpha->alpha_min) | "
        "wsd (alpha_min->alpha over warmup_steps, alpha, cosine back to alpha_min over decay_steps, like the WSD LR).",
    )
    alpha_min: float = opt(0.0, "Lowest alpha of a schedule.", min=0.0, max=1.0)
    teacher_logits: Literal["online", "offline"] = opt(
        "online", "online: run the teacher per batch; offline: read a pd_store."
    )
    store: str | None = opt(None, "offline: logit store folder (default: the closest earlier pd_store stage's folder).")
    skew: float = opt(0.1, "skew_fkl / skew_rkl mixing weight.", min=0.0, max=1.0)
    beta: float = opt(0.5, "jsd beta (TRL convention: 0 = forward KL, 1 = reverse KL).", min=0.0, max=1.0)
    uld_matched_weight: float = opt(1.0, "uld_hybrid: weight of the KL over the shared tokens.", min=0.0)
    uld_unmatched_weight: float = opt(1.0, "uld_hybrid: weight of the ULD over the unshared tokens.", min=0.0)
    keep_best: bool = opt(True, "Also export the lowest held-out-perplexity model to <stage>/best/.")
    eval_at_start: bool = opt(True, "Evaluate once before the first step (logged at step 0; not a 'best' candidate).")

    def validate(self, where: str) -> None:
        truncated = bool(self.top_k)
        if self.teacher_logits == "offline" and not truncated:
            raise UserError(
                f"{where}.top_k: teacher_logits 'offline' needs top_k >= 1 (a store holds truncated distributions)"
            )
        reverse = (
            self.kd_kind == "rkl"
            or (self.kd_kind == "jsd" and self.beta == 1)
            or (self.kd_kind == "skew_rkl" and self.skew == 0)
        )
        if truncated and (reverse or self.kd_kind == "mse"):
            why = (
                "needs full teacher logits"
                if self.kd_kind == "mse"
                else "is reverse KL, infinite against a truncated teacher"
            )
            raise UserError(
                f"{where}.kd_kind: {self.kd_kind!r} {why}; set top_k: 0 (online) or use fkl/skew_fkl/skew_rkl/jsd/tv/ce"
            )
        if self.alpha_schedule != "constant" and self.alpha_min > self.alpha:
            raise UserError(
                f"{where}.alpha_min: {self.alpha_min} is above alpha {self.alpha} (alpha is the schedule's peak)"
            )
        if self.teacher_logits == "online" and self.store:
            raise UserError(f"{where}.store: only used with teacher_logits 'offline'")
        if self.kd_kind in xtok.ULD_KINDS and self.teacher_logits == "offline":
            raise UserError(
                f"{where}.kd_kind: {self.kd_kind!r} needs teacher_logits 'online' (a logit store holds the teacher's "
                "distributions at the student's token positions, which another tokenizer does not have)"
            )


def cross_tokenizer(cfg) -> tuple[str, str]:
    """``Stage.cross_tokenizer``: kd_kind uld/uld_hybrid asks for it; an LM-only stage never uses the teacher."""
    if lm_only(cfg):
        return "", ""
    if cfg.kd_kind in xtok.ULD_KINDS:
        return "token", ""
    return "", f"compares kd_kind '{cfg.kd_kind}' over one vocabulary: set kd_kind: uld or uld_hybrid (online)"


def served_teacher(cfg, logprobs: int) -> str:
    """``Stage.served_teacher``: online PD reads the served top-k (``top_k`` <= teacher.logprobs); an
    offline store is written by pd_store, which a served teacher cannot feed."""
    if lm_only(cfg):
        return ""
    if cfg.teacher_logits == "offline" and not cfg.store:
        return "teacher_logits offline reads a pd_store stage's store, and pd_store needs a local teacher; use online"
    if cfg.teacher_logits == "online" and not (cfg.top_k and cfg.top_k <= logprobs):
        return f"top_k {cfg.top_k}: a served teacher gives its top {logprobs} (teacher.logprobs); set 1 <= top_k <= {logprobs}"
    return truncated_problem(cfg.kd_kind, cfg.skew, cfg.beta)


def check_in_recipe(recipe, index: int, where: str) -> None:
    """An offline pd stage needs a store: ``store`` or an earlier pd_store stage with the same top_p/top_k."""
    cfg = recipe.stages[index]
    if cfg.teacher_logits != "offline" or lm_only(cfg) or cfg.store:
        return
    earlier = [s for s in recipe.stages[:index] if s.type == "pd_store"]
    if not earlier:
        raise UserError(
            f"{where}.store: teacher_logits 'offline' needs a logit store: set store: <folder> "
            "or put a pd_store stage before this stage"
        )
    src = earlier[-1]
    for key in ("top_p", "top_k"):
        if getattr(cfg, key) != getattr(src, key):
            raise UserError(
                f"{where}.{key}: {getattr(cfg, key)} differs from stage '{src.name}' ({key} {getattr(src, key)}), "
                "whose logit store this stage reads; use the same top_p and top_k"
            )


# ---------------------------------------------------------------- data


def source_for(run, cfg, blocks: torch.Tensor, teacher_side: bool) -> ShuffledBatches:
    """Micro-batches of corpus blocks; ``block_idx`` names them (an offline teacher reads its store
    by block); across tokenizers each carries the teacher's side (``Teacher.side_of_blocks``)."""

    def make(idx: list[int]) -> dict:
        ids = blocks[idx].to(run.device)  # (B, T)
        batch = {"input_ids": ids, "block_idx": idx, "num_tokens": ids.shape[0] * (ids.shape[1] - 1)}
        if teacher_side:
            batch.update(run.teacher.side_of_blocks(ids))
            batch["num_tokens"] = {"lm": batch["num_tokens"], "kd": int(batch["pairs_s"].numel())}
        return batch

    return sources.shuffled(run, cfg, len(blocks), make)


def store_folder(run, cfg) -> Path:
    """``cfg.store``, else the folder of the closest pd_store stage before this one."""
    if cfg.store:
        return Path(cfg.store)
    names = [s.name for s in run.recipe.stages]
    here = names.index(cfg.name) if cfg.name in names else len(names)
    for s in reversed(run.recipe.stages[:here]):
        if s.type == "pd_store":
            return run.stage_dir(s.name)
    raise UserError(
        f"stages.{cfg.name}.store: teacher_logits 'offline' needs a logit store: set store: <folder> "
        "or put a pd_store stage before this stage"
    )


def expected_identity(run, cfg, blocks: torch.Tensor) -> dict:
    """The store fields this run needs (see ``logit_store.CHECKED``)."""
    return {
        "tokenizer_hash": logit_store.tokenizer_hash(run.tokenizer),
        "vocab_size": int(run.vocab_size),
        "block_len": int(blocks.shape[1]),
        "n_blocks": int(blocks.shape[0]),
        "corpus_fingerprint": data.corpus_fingerprint(blocks),
        "top_p": float(cfg.top_p),
        "top_k": int(cfg.top_k),
    }


def open_store(run, cfg, blocks: torch.Tensor) -> LogitStore:
    folder = store_folder(run, cfg)
    try:
        store = LogitStore(folder)
        store.check(expected_identity(run, cfg, blocks))
    except UserError as e:  # name the recipe key that led to this store
        raise UserError(f"stages.{cfg.name}.store: {e}") from None
    teacher = store.header.get("teacher")
    if teacher and teacher != run.recipe.teacher.model:
        console.print(
            f"[yellow]logit store {store.folder}: built from teacher {teacher!r}, this run's teacher is "
            f"{run.recipe.teacher.model!r}[/]"
        )
    return store


# ---------------------------------------------------------------- loss


def uses_xtok(cfg) -> bool:
    return cfg.kd_kind in xtok.ULD_KINDS and not lm_only(cfg)


def pd_losses(cfg, logits: torch.Tensor, labels: torch.Tensor, target, *, chunk_size: int = 1024):
    """(lm_sum, kd_sum, student_kept_sum) over all positions of ``logits`` (B, T, V), from one
    ``objectives.ce_and_divergence`` pass (the student's log-softmax per chunk serves the CE, the
    divergence and the student's mass on the kept set). ``student_kept_sum`` is None unless the
    target is ``Truncated`` (and ``student_temperature`` is off)."""
    r = ce_and_divergence(logits, target, labels, None, cfg.kd_kind, cfg, chunk_size=chunk_size)
    return r.ce, r.divergence, r.student_kept


def xtok_kd_sum(run, cfg, logits: torch.Tensor, side: dict) -> torch.Tensor:
    """Sum over the block pairs of the cross-tokenizer divergence to the (truncated) teacher target."""
    return pair_divergence(run.teacher, logits, side, cfg.kd_kind, cfg, top_k=cfg.top_k or 0, truncate=bool(cfg.top_k))


def lm_only(cfg) -> bool:
    """alpha is 0 at every step: a plain LM baseline, the teacher is never run."""
    return cfg.alpha == 0 and (cfg.alpha_schedule == "constant" or cfg.alpha_min == 0)


def alpha_for(cfg, step: int, total: int) -> float:
    """alpha for optimizer step ``step`` (0-based) of ``total``: ``schedules.alpha_at`` with the
    stage's settings (its ``wsd`` uses the LR's own WSD phases, ``warmup_steps``/``decay_steps``)."""
    return alpha_at(
        step,
        total,
        schedule=cfg.alpha_schedule,
        alpha=cfg.alpha,
        alpha_min=cfg.alpha_min,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps,
    )


def make_loss_fn(run, cfg, total: int, teacher=None):
    """PD's loss of a block batch: ``mix(LM, KD, alpha)`` per token; across tokenizers two terms,
    LM per student token and KD per pair. ``teacher``: ``run.teacher`` (default) or a ``StoredTeacher``."""
    teacher = as_teacher(teacher if teacher is not None else run.teacher)

    def pd_loss(model, batch, step: int):
        a = alpha_for(cfg, step, total)
        ids = batch["input_ids"]  # (B, T)
        logits = next_token_logits(model, ids, vocab=run.vocab_size)  # (B, T-1, V)
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        n = logits.shape[0] * logits.shape[1]
        if lm_only(cfg):
            lm, _ = lm_loss(logits, ids[:, 1:], mask)
            return lm, {"alpha": a, "lm_loss": float(lm.detach()) / n}
        if "pairs_s" in batch:  # across tokenizers: LM per student token, KD per pair
            lm, _ = lm_loss(logits, ids[:, 1:], mask)
            kd = xtok_kd_sum(run, cfg, logits, batch)
            m = max(float(batch["num_tokens"]["kd"]), 1.0)
            metrics = {"alpha": a, "lm_loss": float(lm.detach()) / n, "kd_loss": float(kd.detach()) / m}
            metrics["aligned"] = m / n
            return {"lm": (1 - a) * lm, "kd": a * kd}, metrics
        target = teacher.target(ids, cfg.top_p, cfg.top_k, run.vocab_size, block_idx=batch.get("block_idx"))
        lm, kd, kept = pd_losses(cfg, logits, ids[:, 1:], target)
        metrics = {"alpha": a, "lm_loss": float(lm.detach()) / n, "kd_loss": float(kd.detach()) / n}
        if isinstance(target, Truncated):
            metrics["teacher_kept_mass"] = float(kept_mass(target))
            if kept is not None:
                metrics["student_kept_mass"] = float(kept) / n
        return mix(lm, kd, a), metrics

    return pd_loss


# ---------------------------------------------------------------- evaluation


def make_evaluate(run, cfg, blocks: torch.Tensor):
    """Held-out perplexity (and KD loss against the live teacher) on ``blocks`` (N, T).

    Truncated teacher targets (and, across tokenizers, the teacher's side) of the held-out blocks
    are computed once and kept (a few MB); full-distribution targets (top_k 0) are recomputed each
    time (too big to keep)."""
    cache: dict[int, object] = {}

    def batch_of(part: torch.Tensor, start: int) -> dict:
        ids = part.to(run.device)
        if uses_xtok(cfg) and start not in cache:
            cache[start] = run.teacher.side_of_blocks(ids)
        return {"input_ids": ids, "start": start}

    def target_for(start: int, ids: torch.Tensor):
        if start in cache:
            return cache[start]
        t = run.teacher.target(ids, cfg.top_p, cfg.top_k, run.vocab_size)
        if isinstance(t, Truncated):
            cache[start] = t
        return t

    def sums(model, batch, start):
        ids = batch["input_ids"]
        logits = next_token_logits(model, ids, vocab=run.vocab_size)
        positions = logits.shape[0] * logits.shape[1]
        if uses_xtok(cfg):
            side = cache[start]
            lm, _ = lm_loss(logits, ids[:, 1:], torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device))
            kd, units = xtok_kd_sum(run, cfg, logits, side), side["pairs_s"].numel()
        else:
            lm, kd, _ = pd_losses(cfg, logits, ids[:, 1:], target_for(start, ids))
            units = positions
        return {"lm": lm, "kd": kd, "tokens": positions, "kd_units": units}

    def finish(t):
        return {
            **validation.loss_and_ppl(validation.per_token(t["lm"], t["tokens"])),
            "kd_loss": validation.per_token(t["kd"], t["kd_units"]),
        }

    return validation.held_out(run, cfg, blocks, ("lm", "kd", "tokens", "kd_units"), batch_of, sums, finish)


# ---------------------------------------------------------------- the stage


def run(run, cfg: Config, student):
    train_blocks, valid_blocks = run.corpus()
    teacher = run.teacher
    if cfg.teacher_logits == "offline" and not lm_only(cfg):
        store = open_store(run, cfg, train_blocks)
        console.print(f"PD offline: logit store {store.folder} ({store.bytes_per_token:.0f} bytes/token)")
        teacher = StoredTeacher(store, run.device)
    source = source_for(run, cfg, train_blocks, uses_xtok(cfg))
    steps = sources.total_steps(cfg, source)
    return train(
        run,
        cfg,
        student,
        source,
        make_loss_fn(run, cfg, steps, teacher),
        steps,
        evaluate=make_evaluate(run, cfg, valid_blocks) if len(valid_blocks) else None,
        best_by=("ppl", "min"),
        eval_at_start=cfg.eval_at_start,
    )


def preflight(run, cfg) -> None:
    """A logit store given by path is opened and checked against this run before anything is written."""
    if cfg.teacher_logits == "offline" and cfg.store and not lm_only(cfg):
        open_store(run, cfg, run.corpus()[0])


PLOTS = (  # the report's training curves
    Plot("loss", ["loss", "lm_loss", "kd_loss", "valid/loss", "valid/kd_loss"], "Losses", "nats/token"),
    Plot("alpha", ["alpha"], "KD weight alpha", "alpha (0 = LM only, 1 = KD only)", smooth=False),
    Plot("valid_ppl", ["valid/ppl"], "Validation perplexity", "perplexity (log scale)", logy=True),
    Plot(
        "kept_mass", ["teacher_kept_mass", "student_kept_mass"], "Mass on the teacher's kept tokens", "probability mass"
    ),
)

STAGE = Stage(
    "pd",
    Config,
    run,
    needs_corpus=always,
    preflight=preflight,
    check_in_recipe=check_in_recipe,
    plots=PLOTS,
    cross_tokenizer=cross_tokenizer,
    served_teacher=served_teacher,
)

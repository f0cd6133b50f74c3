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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .. import checkpoint as ckpt
from .. import data, logit_store, xtok
from ..batches import ShuffledBatches
from ..config import TrainConfig, opt
from ..errors import UserError
from ..logit_store import LogitStore, truncate_raw
from ..logits import logits_at, next_token_logits
from ..loop import train
from ..losses import Truncated, ce_and_divergence, lm_loss
from ..schedules import alpha_at
from ..tracking import console
from . import Plot, Stage, always


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


def source_for(run, cfg, blocks: torch.Tensor, store: LogitStore | None = None) -> ShuffledBatches:
    acc = run.accelerator

    def make(idx: list[int]) -> dict:
        ids = blocks[idx].to(run.device)  # (B, T)
        batch = {"input_ids": ids, "num_tokens": ids.shape[0] * (ids.shape[1] - 1)}
        if store is not None:
            batch["teacher"] = store.truncated(idx, run.device)  # (B, T-1, K)
        if uses_xtok(cfg):
            batch.update(teacher_blocks(run, ids))
            batch["num_tokens"] = {"lm": batch["num_tokens"], "kd": int(batch["pairs_s"].numel())}
        return batch

    return ShuffledBatches(
        len(blocks),
        cfg.batch_size,
        make,
        seed=run.recipe.seed,
        rank=acc.process_index,
        world=acc.num_processes,
        accum=cfg.grad_accum,
    )


def total_steps(cfg, source: ShuffledBatches) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * source.steps_per_epoch() / cfg.grad_accum))


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


def teacher_blocks(run, ids: torch.Tensor) -> dict:
    """The teacher's tokenization of student blocks ``ids`` (B, T): right-padded teacher ids and
    mask, and the pairs as flat indices into the (B * (L-1)) next-token positions of each side
    (student token i >= 1 is predicted at position i-1; the teacher's BOS prefix in front)."""
    ttok = run.teacher_tokenizer
    prefix = data.special_affixes(ttok)[0]
    views = [run.xtok.teacher_view(row) for row in ids.tolist()]
    width = max(len(prefix) + len(v.ids) for v in views)
    pad = ttok.pad_token_id if ttok.pad_token_id is not None else ttok.eos_token_id
    t_ids = torch.full((len(views), width), pad, dtype=torch.long)
    t_mask = torch.zeros((len(views), width), dtype=torch.long)
    ls, lt, n0 = ids.shape[1] - 1, width - 1, len(prefix)
    s_flat, t_flat = [], []
    for b, v in enumerate(views):
        row = prefix + v.ids
        t_ids[b, : len(row)] = torch.as_tensor(row)
        t_mask[b, : len(row)] = 1
        for i, j in zip(v.student_pairs, v.teacher_pairs):
            if i >= 1 and n0 + j >= 1:
                s_flat.append(b * ls + i - 1)
                t_flat.append(b * lt + n0 + j - 1)
    dev = ids.device
    return {
        "teacher_ids": t_ids.to(dev),
        "teacher_mask": t_mask.to(dev),
        "pairs_s": torch.tensor(s_flat, dtype=torch.long, device=dev),
        "pairs_t": torch.tensor(t_flat, dtype=torch.long, device=dev),
    }


def xtok_kd_sum(run, cfg, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sum over the block pairs of the cross-tokenizer divergence to the (truncated) teacher target."""
    rows = logits.reshape(-1, logits.shape[-1])[batch["pairs_s"]]  # (M, Vs)
    raw = logits_at(run.teacher, batch["teacher_ids"], batch["teacher_mask"], batch["pairs_t"], run.teacher_vocab_size)

    def target(a: int, b: int) -> torch.Tensor:  # (n, Vt) raw log-probs, -inf outside the kept set
        z = raw(a, b)
        if not cfg.top_k:
            return z
        tr = truncate_raw(z, cfg.top_p, cfg.top_k)
        dense = torch.full(z.shape, float("-inf"), dtype=torch.float32, device=z.device)
        return dense.scatter_reduce(-1, tr.indices.long(), tr.logprobs.float(), reduce="amax")

    return xtok.divergence_sum(
        rows,
        target,
        cfg.kd_kind,
        shared=run.xtok.shared(),
        temperature=cfg.temperature,
        student_temperature=cfg.student_temperature,
        top_k=cfg.top_k or 0,
        matched_weight=cfg.uld_matched_weight,
        unmatched_weight=cfg.uld_unmatched_weight,
    )


def teacher_target(run, cfg, ids: torch.Tensor) -> torch.Tensor | Truncated:
    """Online teacher target for blocks ``ids`` (B, T): Truncated (B, T-1, K) raw log-probs, or full logits."""
    with torch.no_grad():
        z = next_token_logits(run.teacher, ids, vocab=run.vocab_size)  # (B, T-1, V)
        return truncate_raw(z, cfg.top_p, cfg.top_k) if cfg.top_k else z


def teacher_kept_mass(target: Truncated) -> torch.Tensor:
    return target.logprobs.float().logsumexp(-1).exp().mean()  # raw (tau = 1) log-probs: the kept mass


def pd_losses(cfg, logits: torch.Tensor, labels: torch.Tensor, target, *, chunk_size: int = 1024):
    """(lm_sum, kd_sum, student_kept_sum) over all positions of ``logits`` (B, T, V).

    One ``losses.ce_and_divergence`` pass: the student's log-softmax per chunk serves the CE, the
    divergence and the student's mass on the kept set (a no-grad by-product), instead of two
    full-vocabulary passes and two backward passes through them. ``student_kept_sum`` is None
    unless the target is ``Truncated`` (and ``student_temperature`` is off).
    """
    r = ce_and_divergence(
        logits,
        target,
        labels,
        None,
        cfg.kd_kind,
        temperature=cfg.temperature,
        student_temperature=cfg.student_temperature,
        skew=cfg.skew,
        beta=cfg.beta,
        chunk_size=chunk_size,
    )
    return r.ce, r.divergence, r.student_kept


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


def make_loss_fn(run, cfg, total: int):
    def pd_loss(model, batch, step: int):
        a = alpha_for(cfg, step, total)
        ids = batch["input_ids"]  # (B, T)
        logits = next_token_logits(model, ids, vocab=run.vocab_size)  # (B, T-1, V)
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        n = logits.shape[0] * logits.shape[1]
        if lm_only(cfg):
            mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
            lm, _ = lm_loss(logits, ids[:, 1:], mask)
            return lm, {"alpha": a, "lm_loss": float(lm.detach()) / n}
        if "pairs_s" in batch:  # across tokenizers: LM per student token, KD per pair
            lm, _ = lm_loss(logits, ids[:, 1:], mask)
            kd = xtok_kd_sum(run, cfg, logits, batch)
            m = max(float(batch["num_tokens"]["kd"]), 1.0)
            metrics = {"alpha": a, "lm_loss": float(lm.detach()) / n, "kd_loss": float(kd.detach()) / m}
            metrics["aligned"] = m / n
            return {"lm": (1 - a) * lm, "kd": a * kd}, metrics
        target = batch["teacher"] if "teacher" in batch else teacher_target(run, cfg, ids)
        lm, kd, kept = pd_losses(cfg, logits, ids[:, 1:], target)
        metrics = {"alpha": a, "lm_loss": float(lm.detach()) / n, "kd_loss": float(kd.detach()) / n}
        if isinstance(target, Truncated):
            metrics["teacher_kept_mass"] = float(teacher_kept_mass(target))
            if kept is not None:
                metrics["student_kept_mass"] = float(kept) / n
        return (1 - a) * lm + a * kd, metrics

    return pd_loss


# ---------------------------------------------------------------- evaluation


def make_evaluate(run, cfg, blocks: torch.Tensor):
    """Held-out perplexity (and KD loss against the live teacher) on ``blocks`` (N, T).

    Truncated teacher targets of the held-out blocks are computed once and kept (a few MB);
    full-distribution targets (top_k 0) are recomputed each time (too big to keep)."""
    acc = run.accelerator
    targets: dict[int, Truncated] = {}

    def target_for(i: int, ids: torch.Tensor):
        if i in targets:
            return targets[i]
        t = teacher_target(run, cfg, ids)
        if isinstance(t, Truncated):
            targets[i] = t
        return t

    views: dict[int, dict] = {}

    def pairs_for(i: int, ids: torch.Tensor) -> dict:
        if i not in views:
            views[i] = teacher_blocks(run, ids)
        return views[i]

    def evaluate(model) -> dict:
        mine = blocks[acc.process_index :: acc.num_processes]
        lm_tot = torch.zeros((), device=run.device)
        kd_tot = torch.zeros((), device=run.device)
        tokens = torch.zeros((), device=run.device)
        kd_units = torch.zeros((), device=run.device)  # pairs across tokenizers, else tokens
        for n, i in enumerate(range(0, len(mine), cfg.batch_size)):
            if cfg.eval_batches is not None and n >= cfg.eval_batches:
                break
            ids = mine[i : i + cfg.batch_size].to(run.device)
            with torch.no_grad(), acc.autocast():
                logits = next_token_logits(model, ids, vocab=run.vocab_size)
                if uses_xtok(cfg):
                    views = pairs_for(i, ids)
                    lm, _ = lm_loss(
                        logits, ids[:, 1:], torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
                    )
                    kd = xtok_kd_sum(run, cfg, logits, views)
                    kd_units += views["pairs_s"].numel()
                else:
                    lm, kd, _ = pd_losses(cfg, logits, ids[:, 1:], target_for(i, ids))
                    kd_units += logits.shape[0] * logits.shape[1]
            lm_tot += lm.float()
            kd_tot += kd.float()
            tokens += logits.shape[0] * logits.shape[1]
        lm_tot, kd_tot, tokens = acc.reduce(lm_tot, "sum"), acc.reduce(kd_tot, "sum"), acc.reduce(tokens, "sum")
        kd_units = acc.reduce(kd_units, "sum")
        loss = float(lm_tot / tokens.clamp(min=1))
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "kd_loss": float(kd_tot / kd_units.clamp(min=1))}

    return evaluate


# ---------------------------------------------------------------- the stage


def run(run, cfg: Config, student):
    train_blocks, valid_blocks = run.corpus()
    store = None
    if cfg.teacher_logits == "offline" and not lm_only(cfg):
        store = open_store(run, cfg, train_blocks)
        console.print(f"PD offline: logit store {store.folder} ({store.bytes_per_token:.0f} bytes/token)")
    source = source_for(run, cfg, train_blocks, store)
    steps = total_steps(cfg, source)
    evaluate = make_evaluate(run, cfg, valid_blocks) if len(valid_blocks) else None
    best_dir = run.stage_dir(cfg.name) / "best"

    def on_best(model):
        if cfg.keep_best:
            run.export(model, best_dir)

    fresh = not (
        run.recipe.resume == "auto"
        and ckpt.list_complete(run.stage_dir(cfg.name) / "checkpoints", report=lambda m: None)
    )
    if evaluate is not None and cfg.eval_at_start and fresh:
        student.eval()
        values = evaluate(student)
        student.train()
        run.log(cfg.name, 0, {f"valid/{k}": v for k, v in values.items()})
        console.print(f"[cyan]{cfg.name} step 0 valid: ppl {values['ppl']:.4g}, kd_loss {values['kd_loss']:.4g}[/]")
    return train(
        run,
        cfg,
        student,
        source,
        make_loss_fn(run, cfg, steps),
        steps,
        evaluate=evaluate,
        best_key="ppl",
        best_mode="min",
        on_best=on_best,
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
)

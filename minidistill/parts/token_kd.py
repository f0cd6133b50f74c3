"""Word-level KD on tokenized instruction rows, as the kd stage (gold responses) and the seqkd
stage (the teacher's samples) both train: the settings (``KDConfig``), the loss (``mix`` of the
gold CE and a divergence to the teacher), validation, the cross-tokenizer path, and the training
call ``train_on_rows``. The method itself is described in ``stages/kd.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from minidistill.config import TrainConfig, opt
from minidistill.functional import xtok
from minidistill.parts import sources, validation
from minidistill.parts.objectives import ce_sum, kd_terms, mix, next_logits, pair_divergence
from minidistill.teacher.served import truncated_problem
from minidistill.training.loop import train


@dataclass
class KDConfig(TrainConfig):
    """The settings of word-level KD (the kd stage's, and seqkd's training on the teacher's samples)."""

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
        "uld / uld_hybrid: cross-tokenizer (minidistill.functional.xtok): sorted-probability W1 at span-aligned "
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


def kd_loss(model, teacher, batch: dict, cfg, vocab_size: int | None = None):
    """The summed KD loss of one batch, ``mix(CE, KD, kd_ratio)``, and per-token metrics {ce, kd}."""
    ce, kd = kd_terms(model, teacher, batch, cfg, vocab_size)
    n = max(float(batch["num_tokens"]), 1.0)
    if kd is None:
        return ce, {"ce": float(ce.detach()) / n}
    return mix(ce, kd, cfg.kd_ratio), {"ce": float(ce.detach()) / n, "kd": float(kd.detach()) / n}


def make_evaluate(run, cfg, rows: list[dict]):
    """Gold CE per response token (loss, ppl) and, when kd_ratio > 0, the divergence per token
    (``kd``) and the training mix (``total``), from one pass."""
    pad, r = run.tokenizer.pad_token_id, cfg.kd_ratio

    def sums(model, batch, start):
        ce, kd = kd_terms(model, run.teacher, batch, cfg, run.vocab_size)
        return {"loss": ce, "tokens": batch["num_tokens"], **({"kd": kd} if kd is not None else {})}

    def finish(t):
        values = validation.loss_and_ppl(validation.per_token(t["loss"], t["tokens"]))
        if r > 0:
            values["kd"] = validation.per_token(t["kd"], t["tokens"])
            values["total"] = (1 - r) * values["loss"] + r * values["kd"]
        return values

    names = ("loss", "tokens", "kd") if r > 0 else ("loss", "tokens")
    return validation.held_out(
        run, cfg, rows, names, lambda part, start: sources.collate(part, pad, run.device), sums, finish
    )


# ---- across tokenizers (kind uld / uld_hybrid) ------------------------------------------------


def cross_tokenizer(cfg) -> tuple[str, str]:
    """``Stage.cross_tokenizer``: kind uld/uld_hybrid asks for it; kd_ratio 0 never uses the teacher."""
    if cfg.kd_ratio == 0:
        return "", ""
    if cfg.kind in xtok.ULD_KINDS:
        return "token", ""
    return "", f"compares kind '{cfg.kind}' over one vocabulary: set kind: uld or uld_hybrid (or kd_ratio: 0)"


def served_teacher(cfg, logprobs: int) -> str:
    """``Stage.served_teacher``: the KD term runs against the served top-k (``losses.Truncated``)."""
    if cfg.kd_ratio == 0:
        return ""
    return truncated_problem(cfg.kind, cfg.skew, cfg.beta)


def uses_xtok(cfg) -> bool:
    return cfg.kd_ratio > 0 and cfg.kind in xtok.ULD_KINDS


def collate_xtok(run, rows: list[dict]) -> dict:
    """Student rows (``sources.collate``) with the teacher's side (``Teacher.collate_side``);
    num_tokens {ce: response tokens, kd: pairs}."""
    batch = sources.collate(rows, run.tokenizer.pad_token_id, run.device)
    batch.update(run.teacher.collate_side(rows, batch["input_ids"].shape[1], run.device))
    batch["num_tokens"] = {"ce": batch["num_tokens"], "kd": int(batch["pairs_s"].numel())}
    return batch


def xtok_terms(run, model, batch: dict, cfg) -> tuple:
    """(CE sum over response tokens, divergence sum over pairs)."""
    logits = next_logits(model, batch)  # (B, L-1, Vs)
    ce = ce_sum(logits, batch["labels"][:, 1:])
    kd = pair_divergence(run.teacher, logits, batch, cfg.kind, cfg, vocab=run.vocab_size, top_k=cfg.uld_top_k)
    return ce, kd


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

    def sums(model, batch, start):
        ce, kd = xtok_terms(run, model, batch, cfg)
        return {"ce": ce, "kd": kd, "tokens": batch["num_tokens"]["ce"], "pairs": batch["num_tokens"]["kd"]}

    def finish(t):
        ce, kd, tokens, n_pairs = (float(t[k]) for k in ("ce", "kd", "tokens", "pairs"))
        loss, div = ce / max(tokens, 1.0), kd / max(n_pairs, 1.0)
        return {**validation.loss_and_ppl(loss), "kd": div, "total": (1 - cfg.kd_ratio) * loss + cfg.kd_ratio * div}

    return validation.held_out(
        run, cfg, rows, ("ce", "kd", "tokens", "pairs"), lambda part, start: collate_xtok(run, part), sums, finish
    )


# ---- the stage --------------------------------------------------------------------------------


def train_on_rows(run, cfg, student, rows: list[dict], valid: list[dict], examples=None, valid_examples=None):
    """The KD loop over tokenized (input_ids, labels) rows; best by gold validation CE. A
    cross-tokenizer kind needs the examples behind the rows (the teacher renders its own prompt).
    SeqKD trains through this too (on the teacher's samples)."""
    if uses_xtok(cfg):
        template = run.recipe.data.template
        rows = run.teacher.side_of_rows(rows, examples, template)
        valid = run.teacher.side_of_rows(valid, valid_examples, template) if valid else []
        source = sources.shuffled(run, cfg, len(rows), lambda idx: collate_xtok(run, [rows[i] for i in idx]))
        loss_fn = lambda model, batch, step: xtok_loss(run, model, batch, cfg)  # noqa: E731
        evaluate = make_xtok_evaluate(run, cfg, valid) if valid else None
    else:
        source = sources.rows_source(run, cfg, rows)
        loss_fn = lambda model, batch, step: kd_loss(model, run.teacher, batch, cfg, run.vocab_size)  # noqa: E731
        evaluate = make_evaluate(run, cfg, valid) if valid else None
    return train(
        run,
        cfg,
        student,
        source,
        loss_fn,
        sources.total_steps(cfg, source),
        evaluate=evaluate,
        best_by=("loss", "min"),
    )

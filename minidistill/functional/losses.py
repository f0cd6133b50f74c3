"""Distillation losses: per-position divergences, a chunked masked wrapper, top-p-k truncation.

Notation: teacher p, student q. Per-position functions take log-probs of shape (N, V), *student
first* (like ``token_divergence`` and TRL), and return the exact divergence over the whole last dim,
shape (N,), with the convention 0 * log 0 = 0. The wrappers return ``(sum, count)``: the sum of the
per-position values over valid positions and the number of valid positions, so the training loop
can divide by a global token count (gradient accumulation, several processes).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from minidistill.functional.kernels import RowForwardKLCE

KINDS = ("fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tv", "ce", "mse")
NEG_INF = float("-inf")


class Truncated(NamedTuple):
    """Teacher distribution kept on K tokens per position; unused slots have logprob -inf."""

    indices: Tensor  # (B, T, K) integer token ids (any valid id in unused slots)
    logprobs: Tensor  # (B, T, K) float log-probs (any per-position offset; -inf = unused)


# ---------------------------------------------------------------- per-position divergences


def _kl(loga: Tensor, logb: Tensor) -> Tensor:
    """KL(a||b) = sum a (log a - log b) over the last dim, 0 log 0 = 0; (N, V) -> (N,)."""
    a = loga.exp()
    diff = torch.where(a > 0, loga - logb, 0.0)  # masked before the product: no 0*inf, no NaN grad
    return (a * diff).sum(-1)


def log_mix(loga: Tensor, logb: Tensor, w: float) -> Tensor:
    """log(w*a + (1-w)*b) from log a and log b, in log space (the one log-of-a-mixture: the skew
    divergences here, the sampler's log p~, ``advantages.mixed_logp``). w = 0 or 1 returns the
    exact endpoint (the input itself); otherwise differentiable, in the inputs' promoted dtype,
    with log w and log(1-w) rounded in that dtype."""
    if w == 0:
        return logb
    if w == 1:
        return loga
    dt = torch.promote_types(loga.dtype, logb.dtype)
    return torch.logaddexp(
        loga + torch.log(torch.tensor(w, dtype=dt)), logb + torch.log(torch.tensor(1.0 - w, dtype=dt))
    )


def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(p||q); (N, V) -> (N,)."""
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(q||p); (N, V) -> (N,)."""
    return _kl(student_logp, teacher_logp)


def skew_forward_kl(student_logp: Tensor, teacher_logp: Tensor, skew: float = 0.1) -> Tensor:
    """DistiLLM skew KL: KL(p || s*p + (1-s)*q); s = 0 is exactly forward KL."""
    return _kl(teacher_logp, log_mix(teacher_logp, student_logp, skew))


def skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, skew: float = 0.1) -> Tensor:
    """DistiLLM skew reverse KL: KL(q || (1-s)*p + s*q); s = 0 is exactly reverse KL."""
    return _kl(student_logp, log_mix(student_logp, teacher_logp, skew))


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD, TRL convention (trl/experimental/gkd/gkd_trainer.py::generalized_jsd_loss).

    m = beta*p + (1-beta)*q and JSD = beta*KL(p||m) + (1-beta)*KL(q||m) for 0 < beta < 1.
    Like TRL, the endpoints are special-cased: beta = 0 is forward KL(p||q), beta = 1 is reverse
    KL(q||p). (The interior formula itself tends to 0 at both ends, so the family is discontinuous
    there.) Equivalently beta*skew_fkl(s=beta) + (1-beta)*skew_rkl(s=1-beta).
    """
    if beta == 0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1:
        return reverse_kl(student_logp, teacher_logp)
    m = log_mix(teacher_logp, student_logp, beta)
    return beta * _kl(teacher_logp, m) + (1 - beta) * _kl(student_logp, m)


def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """0.5 * sum |p - q|; (N, V) -> (N,)."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def soft_cross_entropy(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """-sum p log q = KL(p||q) + H(p) (same gradient as forward KL); (N, V) -> (N,)."""
    p = teacher_logp.exp()
    return -(p * torch.where(p > 0, student_logp, 0.0)).sum(-1)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over the vocab of the squared logit difference (raw logits, not log-probs); (N,)."""
    return (student_logits - teacher_logits).pow(2).mean(-1)


_FULL = {
    "fkl": lambda q, p, s, b: forward_kl(q, p),
    "rkl": lambda q, p, s, b: reverse_kl(q, p),
    "skew_fkl": lambda q, p, s, b: skew_forward_kl(q, p, s),
    "skew_rkl": lambda q, p, s, b: skew_reverse_kl(q, p, s),
    "jsd": lambda q, p, s, b: generalized_jsd(q, p, b),
    "tv": lambda q, p, s, b: total_variation(q, p),
    "ce": lambda q, p, s, b: soft_cross_entropy(q, p),
}


def _kept_skew_rkl(lq_k: Tensor, lp_k: Tensor, q_k: Tensor, q_out: Tensor, s: float) -> Tensor:
    """KL(q || (1-s)p + s*q) when p lives on K slots: kept slots + closed form -q_out*log(s) outside."""
    lm = log_mix(lq_k, lp_k, s)  # (N, K) finite: the student log-probs are finite
    return (q_k * (lq_k - lm)).sum(-1) - q_out * math.log(s)


def _truncated_div(kind: str, lq: Tensor, idx: Tensor, lp_k: Tensor, skew: float, beta: float) -> Tensor:
    """Divergence of a K-slot teacher lp_k (N, K) against the FULL student lq (N, V); (N,)."""
    lq_k = lq.gather(-1, idx)  # (N, K)
    if kind == "jsd" and beta == 0:
        kind = "fkl"
    if kind in ("fkl", "ce", "skew_fkl"):  # every term has p > 0, i.e. lies in the kept set
        return _FULL[kind](lq_k, lp_k, skew, beta)
    q_k = torch.where(lp_k > NEG_INF, lq_k.exp(), 0.0)  # (N, K) student mass on kept slots
    q_out = (1 - q_k.sum(-1)).clamp_min(0)  # (N,) student mass outside the kept set
    if kind == "tv":
        return 0.5 * ((lp_k.exp() - q_k).abs().sum(-1) + q_out)
    if kind == "skew_rkl":
        return _kept_skew_rkl(lq_k, lp_k, q_k, q_out, skew)
    fkl_part = _kl(lp_k, log_mix(lp_k, lq_k, beta))  # jsd, 0 < beta < 1
    return beta * fkl_part + (1 - beta) * _kept_skew_rkl(lq_k, lp_k, q_k, q_out, 1 - beta)


# ---------------------------------------------------------------- CE + divergence: one masked, chunked pass


def _check(kind: str, truncated: bool, temperature: float, skew: float, beta: float, chunk_size: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    if not (temperature > 0 and 0 <= skew <= 1 and 0 <= beta <= 1 and chunk_size >= 1):
        raise ValueError(
            f"need temperature > 0, skew and beta in [0, 1], chunk_size >= 1; got "
            f"{temperature=}, {skew=}, {beta=}, {chunk_size=}"
        )
    if truncated and kind == "mse":
        raise ValueError("kind 'mse' needs full teacher logits, not a truncated teacher distribution")
    if truncated and (kind == "rkl" or (kind == "jsd" and beta == 1) or (kind == "skew_rkl" and skew == 0)):
        raise ValueError(
            f"kind {kind!r} (skew={skew}, beta={beta}) is reverse KL, which is +inf against a "
            "truncated teacher (the student always has mass outside the kept tokens); use full "
            "teacher logits, or fkl / skew_rkl with skew > 0 / jsd with beta < 1 / tv"
        )


class LossSums(NamedTuple):
    """Sums over the valid positions (0-dim tensors) of :func:`ce_and_divergence`."""

    ce: Tensor | None  # token cross-entropy over the whole student head; None without labels
    divergence: Tensor | None  # the divergence ``kind``; None without a teacher
    count: Tensor  # number of valid positions
    student_kept: Tensor | None  # no-grad student mass on a truncated teacher's kept set; else None


def ce_and_divergence(
    student_logits: Tensor,
    teacher: Tensor | Truncated | None,
    labels: Tensor | None,
    mask: Tensor | None = None,
    kind: str = "fkl",
    *,
    vocab: int | None = None,
    temperature: float = 1.0,
    student_temperature: bool = False,
    skew: float = 0.1,
    beta: float = 0.5,
    chunk_size: int = 1024,
) -> LossSums:
    """Token cross-entropy and a divergence to the teacher, summed over valid positions, in one pass.

    The one entry point for a CE + distillation loss (KD, PD, MiniLLM's L_PT; ``lm_loss``,
    ``token_divergence`` and ``forward_kl_and_ce`` call it). student_logits (B, T, V) any float
    dtype; ``labels`` (B, T) aligned with the logits (the caller shifts; ignored where ``mask`` is
    False; None: no CE); ``mask`` (B, T) (None: every position); ``teacher`` full logits (B, T, V)
    or ``Truncated`` (B, T, K), detached (None: no divergence).

    CE is over the whole student head; the divergence over the first ``vocab`` logits of student
    and full teacher (None: all; a full teacher must then be as wide as the student). Kinds: fkl,
    rkl, skew_fkl, skew_rkl (``skew``), jsd (``beta``, TRL convention), tv, ce (soft cross-entropy),
    mse (raw logits; full teacher only). The teacher is tempered (logits/tau; truncated:
    log_softmax(logprobs/tau) over the kept set); with ``student_temperature`` the student's
    divergence side is tempered too and the divergence scaled by tau**2 (CE stays untempered).
    A truncated teacher is compared with the student's FULL softmax; reverse-KL-like kinds and mse
    raise ValueError there. ``student_kept`` (truncated teacher, no student temperature) is the
    student's probability on the kept slots, summed over positions, without grad.

    Two paths, the same numbers up to float rounding: forward KL against full teacher logits at
    tau = 1 with CE over the same vocabulary runs the fused kernel ``kernels.RowForwardKLCE`` (both
    log-softmaxes once per chunk, recomputed in backward: no (N, V) float32 tensor is kept); every
    other case runs ``chunk_size`` valid rows at a time in float32 through autograd, one student
    log-softmax per chunk shared by CE, divergence and kept mass (the kinds without a closed-form
    fused backward live there).
    """
    truncated = isinstance(teacher, Truncated)
    if teacher is not None:
        _check(kind, truncated, temperature, skew, beta, chunk_size)
    elif chunk_size < 1:
        raise ValueError(f"need chunk_size >= 1, got {chunk_size=}")
    if teacher is None and labels is None:
        raise ValueError("ce_and_divergence needs labels (CE), a teacher (divergence) or both")
    B, T, Vs = student_logits.shape
    if mask is None:
        mask = torch.ones((B, T), dtype=torch.bool, device=student_logits.device)
    if mask.shape != (B, T) or (labels is not None and labels.shape != (B, T)):
        if labels is None:
            raise ValueError(f"mask shape {tuple(mask.shape)} != student (B, T) {(B, T)}")
        raise ValueError(f"labels {tuple(labels.shape)} / mask {tuple(mask.shape)} must be (B, T) = {(B, T)}")
    v = Vs if vocab is None else int(vocab)
    if not 1 <= v <= Vs:
        raise ValueError(f"vocab {vocab} must be in [1, {Vs}] (the student head's width)")
    if truncated:
        if teacher.indices.shape != teacher.logprobs.shape or teacher.indices.shape[:2] != (B, T):
            raise ValueError(
                f"truncated teacher shapes {tuple(teacher.indices.shape)}, "
                f"{tuple(teacher.logprobs.shape)} do not match (B, T, K) with {(B, T)}"
            )
    elif teacher is not None:
        if vocab is None and teacher.shape != student_logits.shape:
            raise ValueError(f"teacher logits shape {tuple(teacher.shape)} != student {tuple(student_logits.shape)}")
        if teacher.shape[:2] != (B, T) or teacher.shape[-1] < v:
            raise ValueError(f"teacher logits shape {tuple(teacher.shape)} does not cover (B, T, vocab) = {(B, T, v)}")
    keep = mask.reshape(-1).bool()  # (B*T,)
    all_valid = bool(keep.all())

    def valid_rows(x: Tensor) -> Tensor:  # (B, T, ...) -> (N, ...): views when every position is valid
        x = x.reshape(B * T, *x.shape[2:])
        return x if all_valid else x[keep]

    rows = valid_rows(student_logits)  # (N, Vs) original dtype
    y = valid_rows(labels).long() if labels is not None else None  # (N,)
    tau = float(temperature)
    if not truncated and teacher is not None and y is not None and kind == "fkl" and tau == 1 and v == Vs:
        t_full = teacher.detach()
        kl, ce = RowForwardKLCE.apply(
            rows, valid_rows(t_full[..., :v] if t_full.shape[-1] > v else t_full), y, int(chunk_size)
        )
        return LossSums(ce.sum(), kl.sum(), keep.sum(), None)

    if truncated:
        t_idx = valid_rows(teacher.indices).long().split(chunk_size)  # (n, K) chunks
        t_rows = valid_rows(teacher.logprobs.detach()).split(chunk_size)  # (n, K) chunks
    elif teacher is not None:
        t_full = teacher.detach()
        t_rows = valid_rows(t_full[..., :v] if t_full.shape[-1] > v else t_full).split(chunk_size)  # (n, v)
    ys = y[:, None].split(chunk_size) if y is not None else None
    with_kept = truncated and not student_temperature
    ce = div = None
    kept = torch.zeros((), device=student_logits.device) if with_kept else None
    for i, chunk in enumerate(rows.split(chunk_size)):  # split: cheap backward (cat of grads)
        s = chunk.float()  # (n, Vs)
        lq_ce = F.log_softmax(s, -1) if ys is not None else None  # (n, Vs) student log-probs
        if ys is not None:
            c = -lq_ce.gather(-1, ys[i]).sum()
            ce = c if ce is None else ce + c
        if teacher is None:
            continue
        sd = s[:, :v] if v < Vs else s  # (n, v) the divergence's student logits
        if student_temperature and tau != 1:
            sd = sd / tau
        t = t_rows[i].float()
        if tau != 1:
            t = t / tau
        if kind == "mse":
            d = logit_mse(sd, t).sum()
        else:
            lq = lq_ce if (lq_ce is not None and sd is s) else F.log_softmax(sd, -1)  # (n, v)
            lp = F.log_softmax(t, -1)  # (n, v) or (n, K) teacher target
            if truncated:
                d = _truncated_div(kind, lq, t_idx[i], lp, skew, beta).sum()
                if with_kept:
                    with torch.no_grad():
                        kept += torch.where(lp > NEG_INF, lq.gather(-1, t_idx[i]).exp(), 0.0).sum()
            else:
                d = _FULL[kind](lq, lp, skew, beta).sum()
        div = d if div is None else div + d
    if rows.shape[0] == 0:  # no valid position: exact zeros still connected to the graph
        zero = rows.float().sum()
        ce = zero if ys is not None else None
        div = zero if teacher is not None else None
    if div is not None and student_temperature:
        div = div * tau**2
    return LossSums(ce, div, keep.sum(), kept)


def token_divergence(
    student_logits: Tensor,
    teacher: Tensor | Truncated,
    mask: Tensor,
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    student_temperature: bool = False,
    skew: float = 0.1,
    beta: float = 0.5,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Sum over valid positions of the per-position divergence ``kind``; returns (sum, count).

    :func:`ce_and_divergence` without CE (see it for the kinds, temperatures and truncated
    teachers): student_logits (B, T, V), teacher full logits (B, T, V) or ``Truncated``. Valid
    positions are processed ``chunk_size`` rows at a time in float32.
    """
    if teacher is None:
        raise ValueError("token_divergence needs a teacher")
    r = ce_and_divergence(
        student_logits,
        teacher,
        None,
        mask,
        kind,
        temperature=temperature,
        student_temperature=student_temperature,
        skew=skew,
        beta=beta,
        chunk_size=chunk_size,
    )
    return r.divergence, r.count


def lm_loss(logits: Tensor, labels: Tensor, mask: Tensor, *, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Token cross-entropy summed over valid positions; returns (sum, count).

    labels (B, T) are already aligned with the logits (the caller shifts). ``mask`` is
    authoritative: labels at masked positions are ignored (e.g. -100); valid ones must be real ids.
    (:func:`ce_and_divergence` without a teacher.)
    """
    r = ce_and_divergence(logits, None, labels, mask, chunk_size=chunk_size)
    return r.ce, r.count


def forward_kl_and_ce(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, mask: Tensor, *, chunk_size: int = 512
) -> tuple[Tensor, Tensor, Tensor]:
    """(forward-KL sum, cross-entropy sum, count) over valid positions, in one fused pass.

    :func:`ce_and_divergence` with kind fkl at tau = 1 (the fused ``kernels.RowForwardKLCE``):
    the student's and teacher's log-softmaxes are computed once per chunk for both terms and
    recomputed in backward instead of saved, so no (B, T, V) float32 tensor exists.
    student_logits, teacher_logits (B, T, V) any float dtype; labels (B, T) aligned with the
    logits (ignored where ``mask`` is False).
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits shape {tuple(teacher_logits.shape)} != student {tuple(student_logits.shape)}")
    r = ce_and_divergence(student_logits, teacher_logits, labels, mask, "fkl", chunk_size=chunk_size)
    return r.divergence, r.ce, r.count


# ---------------------------------------------------------------- truncation (PD "top-p-k")


def truncate_top_p_k(
    teacher_logits: Tensor, top_p: float = 0.95, top_k: int = 50, *, renormalize: bool = True, chunk_rows: int = 32
) -> Truncated:
    """Keep, per position, the smallest descending prefix whose probability reaches ``top_p``
    (at least 1 token, at most ``top_k``; top_p = 1 keeps all top_k). Log-probs at tau = 1 are
    renormalised over the kept set (``renormalize=False``: the teacher's full-softmax log-probs on
    the kept slots, as the offline store keeps them). Width K = top_k always (padded); unused
    slots: index 0, -inf. Upcasts ``chunk_rows`` positions at a time (one small float32 chunk).
    """
    if not (0 < top_p <= 1 and top_k >= 1):
        raise ValueError(f"need 0 < top_p <= 1 and top_k >= 1; got {top_p=}, {top_k=}")
    *lead, V = teacher_logits.shape
    k = min(top_k, V)
    vals, idxs = [], []
    for chunk in teacher_logits.detach().reshape(-1, V).split(chunk_rows):
        z = chunk.float()  # (n, V)
        v, i = z.topk(k, dim=-1)  # (n, k) sorted descending
        vals.append(v - z.logsumexp(-1, keepdim=True))  # log-probs at tau = 1
        idxs.append(i)
    if vals:
        lp, idx = torch.cat(vals).reshape(*lead, k), torch.cat(idxs).reshape(*lead, k)
    else:
        lp = teacher_logits.new_zeros((*lead, k), dtype=torch.float32)
        idx = torch.zeros((*lead, k), dtype=torch.long, device=teacher_logits.device)
    keep = lp > NEG_INF
    if top_p < 1:
        cum = lp.exp().cumsum(-1)
        before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], -1)  # mass of better tokens
        keep &= before < top_p  # slot 0 always kept
    lp = lp.masked_fill(~keep, NEG_INF)
    if renormalize:
        lp = lp - lp.logsumexp(-1, keepdim=True)
    idx = idx.masked_fill(~keep, 0)
    if k < top_k:
        idx = F.pad(idx, (0, top_k - k), value=0)
        lp = F.pad(lp, (0, top_k - k), value=NEG_INF)
    return Truncated(idx, lp)


def kept_mass(logits: Tensor, truncated: Truncated) -> Tensor:
    """Probability mass softmax(logits) puts on the kept set, per position; (B, T) float32.

    Use the teacher logits for the teacher mass kept before renormalisation, the student logits
    for the student mass on the kept set (1 - it is what counts as 'outside' in the losses).
    """
    z = logits.float()  # (B, T, V)
    lp = z.gather(-1, truncated.indices.long()) - z.logsumexp(-1, keepdim=True)  # (B, T, K)
    return torch.where(truncated.logprobs > NEG_INF, lp.exp(), 0.0).sum(-1)

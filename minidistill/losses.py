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

from .kernels import RowForwardKLCE

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
    return torch.logaddexp(loga + torch.log(torch.tensor(w, dtype=dt)), logb + torch.log(torch.tensor(1.0 - w, dtype=dt)))


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


# ---------------------------------------------------------------- masked, chunked wrappers


def _check(kind: str, truncated: bool, temperature: float, skew: float, beta: float, chunk_size: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    if not (temperature > 0 and 0 <= skew <= 1 and 0 <= beta <= 1 and chunk_size >= 1):
        raise ValueError(f"need temperature > 0, skew and beta in [0, 1], chunk_size >= 1; got "
                         f"{temperature=}, {skew=}, {beta=}, {chunk_size=}")
    if truncated and kind == "mse":
        raise ValueError("kind 'mse' needs full teacher logits, not a truncated teacher distribution")
    if truncated and (kind == "rkl" or (kind == "jsd" and beta == 1) or (kind == "skew_rkl" and skew == 0)):
        raise ValueError(f"kind {kind!r} (skew={skew}, beta={beta}) is reverse KL, which is +inf against a "
                         "truncated teacher (the student always has mass outside the kept tokens); use full "
                         "teacher logits, or fkl / skew_rkl with skew > 0 / jsd with beta < 1 / tv")


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

    student_logits (B, T, V) any float dtype; teacher is full logits (B, T, V) or ``Truncated``
    (treated as a constant: detached). Kinds: fkl, rkl, skew_fkl, skew_rkl (``skew``), jsd
    (``beta``, TRL convention), tv, ce (soft cross-entropy), mse (logits; full teacher only).
    The teacher is tempered (logits/tau; truncated: log_softmax(logprobs/tau) over the kept set).
    With ``student_temperature`` the student is tempered too and the result scaled by tau**2.
    A truncated teacher is compared with the student's FULL softmax; reverse-KL-like kinds and
    mse raise ValueError there. Valid positions are processed ``chunk_size`` rows at a time in
    float32, so only one chunk of full-vocab float32 temporaries is alive in the forward pass.
    """
    truncated = isinstance(teacher, Truncated)
    _check(kind, truncated, temperature, skew, beta, chunk_size)
    B, T, V = student_logits.shape
    if mask.shape != (B, T):
        raise ValueError(f"mask shape {tuple(mask.shape)} != student (B, T) {(B, T)}")
    keep = mask.reshape(-1).bool()  # (B*T,)
    rows = student_logits.reshape(-1, V)[keep]  # (N, V) original dtype
    if truncated:
        if teacher.indices.shape != teacher.logprobs.shape or teacher.indices.shape[:2] != (B, T):
            raise ValueError(f"truncated teacher shapes {tuple(teacher.indices.shape)}, "
                             f"{tuple(teacher.logprobs.shape)} do not match (B, T, K) with {(B, T)}")
        K = teacher.indices.shape[-1]
        t_idx = teacher.indices.reshape(-1, K)[keep].long().split(chunk_size)  # (n, K) chunks
        t_rows = teacher.logprobs.detach().reshape(-1, K)[keep].split(chunk_size)  # (n, K) chunks
    else:
        if teacher.shape != student_logits.shape:
            raise ValueError(f"teacher logits shape {tuple(teacher.shape)} != student {tuple(student_logits.shape)}")
        t_idx = None
        t_rows = teacher.detach().reshape(-1, V)[keep].split(chunk_size)  # (n, V) chunks
    tau = float(temperature)
    total: Tensor | None = None
    for i, chunk in enumerate(rows.split(chunk_size)):  # split: cheap backward (cat of grads)
        s = chunk.float()  # (n, V)
        if student_temperature and tau != 1:
            s = s / tau
        t = t_rows[i].float()
        if tau != 1:
            t = t / tau
        if kind == "mse":
            value = logit_mse(s, t)
        elif truncated:
            value = _truncated_div(kind, F.log_softmax(s, -1), t_idx[i], F.log_softmax(t, -1), skew, beta)
        else:
            value = _FULL[kind](F.log_softmax(s, -1), F.log_softmax(t, -1), skew, beta)
        total = value.sum() if total is None else total + value.sum()
    if total is None:  # no valid position: an exact 0 still connected to the graph
        total = rows.float().sum()
    if student_temperature:
        total = total * tau**2
    return total, keep.sum()


def lm_loss(logits: Tensor, labels: Tensor, mask: Tensor, *, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Token cross-entropy summed over valid positions; returns (sum, count).

    labels (B, T) are already aligned with the logits (the caller shifts). ``mask`` is
    authoritative: labels at masked positions are ignored (e.g. -100); valid ones must be real ids.
    """
    B, T, V = logits.shape
    if labels.shape != (B, T) or mask.shape != (B, T):
        raise ValueError(f"labels {tuple(labels.shape)} / mask {tuple(mask.shape)} must be (B, T) = {(B, T)}")
    keep = mask.reshape(-1).bool()  # (B*T,)
    rows = logits.reshape(-1, V)[keep]  # (N, V)
    targets = labels.reshape(-1)[keep].long().split(chunk_size)
    parts = [F.cross_entropy(c.float(), y, reduction="sum") for c, y in zip(rows.split(chunk_size), targets)]
    total = torch.stack(parts).sum() if parts else rows.float().sum()  # (N == 0: exact 0 with a graph)
    return total, keep.sum()


def forward_kl_and_ce(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, mask: Tensor, *,
                      chunk_size: int = 512) -> tuple[Tensor, Tensor, Tensor]:
    """(forward-KL sum, cross-entropy sum, count) over valid positions, in one fused pass.

    The same numbers as ``token_divergence(..., kind="fkl")`` and ``lm_loss`` (teacher detached,
    tau = 1), but the student's and teacher's log-softmaxes are computed once per chunk for both
    terms and recomputed in backward instead of saved: no (B, T, V) float32 tensor exists, and
    the backward is one pass. student_logits, teacher_logits (B, T, V) any float dtype; labels
    (B, T) aligned with the logits (ignored where ``mask`` is False).
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits shape {tuple(teacher_logits.shape)} != student {tuple(student_logits.shape)}")
    B, T, V = student_logits.shape
    if labels.shape != (B, T) or mask.shape != (B, T):
        raise ValueError(f"labels {tuple(labels.shape)} / mask {tuple(mask.shape)} must be (B, T) = {(B, T)}")
    keep = mask.reshape(-1).bool()
    s, t = student_logits.reshape(-1, V), teacher_logits.detach().reshape(-1, V)
    y = labels.reshape(-1).long()
    if not bool(keep.all()):  # gather the valid rows (all-valid batches, the usual case, are views)
        s, t, y = s[keep], t[keep], y[keep]
    kl, ce = RowForwardKLCE.apply(s, t, y, int(chunk_size))
    return kl.sum(), ce.sum(), keep.sum()


# ---------------------------------------------------------------- truncation (PD "top-p-k")


def truncate_top_p_k(teacher_logits: Tensor, top_p: float = 0.95, top_k: int = 50, *, renormalize: bool = True,
                     chunk_rows: int = 32) -> Truncated:
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

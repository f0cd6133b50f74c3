"""The pure math of the MiniLLM update: rewards, returns, advantages and the two loss terms.

Notation: prompt x, response y = y_1..y_T, teacher p, student q (= q_theta), sampling
distribution p~ = a*p + (1-a)*q (a = 0: pure student sampling). All tensors are (B, T) and
RIGHT-padded; ``mask`` is 1 on valid response tokens (EOS included) and the valid tokens are a
prefix of each row. Every function here gives the same values on valid positions however much
right-padding a row carries, and puts 0 (never NaN) on padding. Losses return
``(sum, count)``: a 0-dim sum over valid tokens and the number of valid tokens, so the caller can
divide by a global token count.

The gradient being estimated
----------------------------
KL(q||p) over whole responses = E_{y~q} sum_t -r_t with r_t = log p(y_t|y_<t) - log q(y_t|y_<t).
Its gradient is -E_q sum_t R_t grad log q(y_t|y_<t) with R_t = sum_{t'>=t} r_t'. MiniLLM splits
R_t = r_t + R_{t+1}:

* single-step part: E_q sum_t grad KL(q(.|y_<t) || p(.|y_<t)), the exact per-position reverse
  KL over the whole vocabulary (:func:`single_step_kl`);
* long-term part: -E_q sum_t R_{t+1} grad log q(y_t|y_<t), a policy gradient with the return
  from the NEXT token (:func:`returns` with ``include_current=False``, :func:`pg_loss`).

With gamma = 1, no length normalisation, no whitening, no clipping and a = 0 the sum of the two
surrogate losses has exactly grad KL(q||p) as its expected gradient; tests/unit/test_advantages.py
checks this by enumerating every response of a tabular model.

Importance weights for teacher-mixed sampling (y ~ p~), verified by the same enumeration:

* single-step term at t: it depends on y_<t only, so it needs the PREFIX product
  prod_{t'<t} q(y_t')/p~(y_t') (the current token is not part of it; multiplying in w_t as well is
  still unbiased, only noisier).
* long-term term at t: R_{t+1} depends on every later token (and, with length normalisation, on
  where the response ends), so it needs the WHOLE-SEQUENCE product prod_{all valid t'} w_t'.
  The product up to and including t (the paper's nominal w_t) is biased. In :func:`pg_loss` the
  ratio rho_t = q(y_t)/p~(y_t) already supplies the factor w_t (taking ``logp_behaviour`` =
  log p~), so the advantage is multiplied by prod_{t' != t} w_t'
  (``SequenceWeights.long_term``).
* the paper replaces both by the per-step weight w_t = q(y_t)/p~(y_t) (<= 1/(1-a)):
  :func:`step_importance_weights` for the single-step term, rho for the long-term term. This is
  biased by design (bounded variance instead); exact weights explode as (1/(1-a))^T and are
  only practical for short responses or as a check.

:func:`single_step_weights` picks the single-step weight for the stage's ``importance`` setting
("step": w_t; "exact": the prefix product); with "exact" the stage also multiplies the advantage
by ``SequenceWeights.long_term``. tests/unit/test_advantages.py enumerates every response through the
stage's own ``advantages_for`` and ``minillm_loss``: "exact" has zero bias, "step" does not.

Split buffers (the stage's ``student_rows``): a share of the rows is sampled at a = 0 and only
those carry the long-term term (rho = q_theta/q_old, advantage times rows/student rows), every
row the single-step term. With exact prefix weights on the single-step term that is exactly
unbiased; with per-step weights only the single-step term on the mixed rows keeps a bias (the
enumeration in tests/unit/test_advantages.py: relative bias 0.18 unsplit, 0.04 split at s 0.5).

Presets (``stages.minillm.PRESETS``; both use a = 0.2 and PPO clip 0.2)
-----------------------------------------------------------------------
``"paper"``: return R_{t+1} from the next token, gamma 1, length-normalised, no whitening,
reward scale 1, per-step importance weight on the single-step term. It is the estimator the
paper writes down; with length normalisation and clipping off it is exactly unbiased at a = 0.

``"official"`` (microsoft/LMOps minillm): return includes the current token and is discounted
with gamma 0.95, length-normalised by the number of remaining tokens including t, advantages
whitened over the batch (here over VALID tokens only, fixing the official code, which counts
padding), reward scale 2 (official divides by reward_scaling 0.5; with whitening on this is a
no-op up to the 1e-8 epsilon), no importance weight on the single-step term. Because the return
includes r_t while the single-step term is also added, the current-token KL is counted twice
(in expectation, without whitening, the single-step gradient gets weight 2), and gamma 0.95 makes
the long-term term look about 20 tokens ahead.

Default: ``"minidistill"`` (``stages.minillm.PRESETS``): the paper's estimator (return from the next token,
gamma 1, no double-counted current-token KL, per-step weights on the single-step term) with two
changes. (1) Advantages are whitened over valid tokens, as the official code does: that subtracts
a constant baseline from the long-term term (unbiased) and divides it by the batch's std(R), which
the single-step term does not get, so the SUM of the two terms no longer points along the true
gradient: it re-weights the long-term part by 1/std(R) (cosine with the true expected gradient
below 1, measured by tests/unit/test_advantages.py). We accept that for the official hyper-parameters
(lr 5e-6, clip 0.2, 4 PPO epochs), which were tuned against unit-scale advantages: unwhitened,
the advantage is in raw nats and the same lr gives a step that moves with the teacher-student gap.
(2) A response cut at the token limit bootstraps its last token's return (see :func:`returns`).
(3) The teacher share a decays linearly from 0.2 at the first rollout buffer to 0 at the last
(``mix_alpha_end``; the stage sets each buffer's a): the long-term term's per-step weights are
biased against EOS under mixing (docs/eos), exact at a = 0.
``"paper"`` is the estimator whose expectation is exactly the gradient (with length
normalisation and clipping off, at a = 0; the enumeration test verifies it); ``"official"``
reproduces microsoft/LMOps for comparison. The padding fixes here apply to all three.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from minidistill.functional.kernels import RowReverseKL
from minidistill.functional.kernels import compute_dtype as _compute_dtype
from minidistill.functional.losses import log_mix

__all__ = [
    "SequenceWeights",
    "masked_moments",
    "mixed_logp",
    "pg_loss",
    "returns",
    "sequence_importance_weights",
    "single_step_kl",
    "single_step_weights",
    "step_importance_weights",
    "token_rewards",
    "whiten",
]


def token_rewards(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Per-token reward scale * (log p(y_t) - log q(y_t)), detached, exactly 0 at padding. (B, T)"""
    valid = mask.bool()  # (B, T)
    dt = _compute_dtype(torch.promote_types(teacher_logp.dtype, student_logp.dtype))
    r = scale * (teacher_logp.detach().to(dt) - student_logp.detach().to(dt))  # (B, T)
    return torch.where(valid, r, torch.zeros((), dtype=dt, device=r.device))


def returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    include_current: bool = False,
    length_norm: bool = True,
    ended: torch.Tensor | None = None,
) -> torch.Tensor:
    """Discounted (optionally length-normalised) returns. (B, T)

    include_current=False (paper): R_{t+1} = sum_{t'>t, valid} gamma^(t'-t-1) r_t'.
    include_current=True (official): sum_{t'>=t, valid} gamma^(t'-t) r_t'.
    The discount is relative to t, never by absolute position. With ``length_norm`` the sum is
    divided by its number of valid terms (0 terms -> 0; the paper's printed 1/(T-t-1) is off by
    one for R_{t+1} = sum_{t'=t+1..T}). Padding gets 0. Vectorised as r @ D^T with a (T, T)
    discount matrix.

    ``ended`` (B,) bool: False for a row cut at the token limit instead of stopping on EOS. With
    length normalisation and the return from the next token, the last token of such a row would
    get 0 (no observed terms), the value only a finished response's EOS has earned (nothing
    follows it, while every other token's return is about -KL): the cut would share the stop
    token's credit. Its unobserved continuation is instead estimated by the row's mean reward
    (the per-token mean it would have been normalised to). Other positions are unchanged.
    """
    valid = mask.bool()  # (B, T)
    dt = _compute_dtype(rewards.dtype)
    r = torch.where(valid, rewards.to(dt), torch.zeros((), dtype=dt, device=rewards.device))
    T = r.shape[-1]
    idx = torch.arange(T, device=r.device)
    diff = idx[None, :] - idx[:, None]  # (T, T): t' - t
    offset = 0 if include_current else 1
    # D[t, t'] = gamma^(t' - t - offset) for t' >= t + offset, else 0.
    expo = (diff - offset).to(torch.float64)
    powers = torch.full_like(expo, float(gamma)).pow(expo.clamp(min=0))
    disc = torch.where(expo >= 0, powers, torch.zeros_like(expo)).to(dt)  # (T, T)
    with torch.autocast(r.device.type, enabled=False):  # exact in dt whatever the caller's autocast
        out = r @ disc.T  # (B, T): out[b, t] = sum_t' r[b, t'] D[t, t']
    if length_norm:
        length = valid.sum(-1, keepdim=True)  # (B, 1)
        n_terms = (length - idx[None, :] - offset).clamp(min=0)  # (B, T)
        out = out / n_terms.clamp(min=1).to(dt)
        if ended is not None:
            row_mean = r.sum(-1, keepdim=True) / length.clamp(min=1).to(dt)  # (B, 1)
            cut = (n_terms == 0) & ~ended.bool()[:, None].to(r.device)  # (B, T)
            out = torch.where(cut, row_mean.expand_as(out), out)
    return torch.where(valid, out, torch.zeros((), dtype=dt, device=r.device))


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, sum of squares, count) over valid tokens, float64 0-dim tensors (all-reducible)."""
    valid = mask.bool()  # (B, T)
    xv = torch.where(valid, x.detach().to(torch.float64), torch.zeros((), dtype=torch.float64))
    return xv.sum(), (xv * xv).sum(), valid.sum().to(torch.float64)


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean/var over VALID tokens only. (B, T)

    ``stats`` = (sum, sum_sq, count), e.g. :func:`masked_moments` all-reduced across processes;
    default: this batch's. Variance is the population one (divide by count), as in the
    official distributed path. ``shift_mean=False`` adds the mean back (scale only). Padding -> 0.
    """
    valid = mask.bool()  # (B, T)
    s, ss, n = masked_moments(x, mask) if stats is None else stats
    dt = _compute_dtype(x.dtype)
    n = torch.as_tensor(n, dtype=torch.float64, device=x.device)
    if n.item() == 0:
        return torch.zeros_like(x, dtype=dt)
    mean = torch.as_tensor(s, dtype=torch.float64, device=x.device) / n
    var = (torch.as_tensor(ss, dtype=torch.float64, device=x.device) / n - mean * mean).clamp(min=0)
    out = (x.to(torch.float64) - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, torch.zeros((), dtype=torch.float64, device=x.device)).to(dt)


def pg_loss(
    logp_new: torch.Tensor,
    logp_behaviour: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clipped policy-gradient loss: (sum, count, clip_fraction).

    rho = exp(logp_new - logp_behaviour), logp_behaviour = log p~(y_t) of the sampling
    distribution (detached), so rho = w_t at the rollout policy; loss_t = -min(rho*A,
    clip(rho, 1-eps, 1+eps)*A) with A detached. ``clip_eps=None``: no clipping.
    clip_fraction = share of valid tokens whose clipped branch is active (0-dim).
    """
    valid = mask.bool()  # (B, T)
    dt = _compute_dtype(logp_new.dtype)
    zero = torch.zeros((), dtype=dt, device=logp_new.device)
    log_ratio = torch.where(valid, logp_new.to(dt) - logp_behaviour.detach().to(dt), zero)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = torch.where(valid, advantages.detach().to(dt), zero)  # (B, T)
    loss = -ratio * adv  # (B, T)
    count = valid.sum()
    if clip_eps is None:
        clip_fraction = torch.zeros((), dtype=dt, device=logp_new.device)
    else:
        clipped = -torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv  # (B, T)
        active = (clipped > loss) & valid
        loss = torch.maximum(loss, clipped)
        clip_fraction = active.sum().to(dt) / count.clamp(min=1).to(dt)
    total = torch.where(valid, loss, zero).sum()
    return total, count, clip_fraction


def single_step_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-position reverse KL(q(.|y_<t) || p(.|y_<t)) over the vocabulary: (sum, count).

    student_logits, teacher_logits: (B, T, V), the logits that predict y_t (teacher detached),
    divided by ``temperature`` inside. weights: optional (B, T) per-token weights (detached; e.g.
    importance weights). Computed in at least float32, ``chunk_size`` positions at a time; padding
    logits are never read, so they may hold anything.
    """
    kl, _ = reverse_kl_and_logp(
        student_logits, teacher_logits, mask, None, chunk_size=chunk_size, temperature=temperature
    )
    if weights is not None:  # where, not a product: weights at padding may hold anything
        kl = torch.where(mask.bool(), kl * weights.detach().to(kl.dtype), torch.zeros((), dtype=kl.dtype))
    return kl.sum(), mask.bool().sum()


def reverse_kl_and_logp(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: the exact reverse KL(q || p) over the vocabulary and log q(target), both
    (B, T), 0 at padding, differentiable w.r.t. the student logits; one chunked pass computes
    the softmaxes both terms share (the policy-gradient term needs log q(y_t), the single-step
    term the KL). Logits (B, T, V) are divided by ``temperature``; ``targets`` may be None."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student/teacher logits shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape, V = mask.shape, student_logits.shape[-1]
    valid = mask.bool().reshape(-1)  # (B*T,)
    tgt = targets.reshape(-1).long() if targets is not None else None
    kl, logq = RowReverseKL.apply(
        student_logits.reshape(-1, V),
        teacher_logits.detach().reshape(-1, V),
        valid,
        tgt,
        int(chunk_size),
        1.0 / float(temperature),
    )
    return kl.reshape(shape), logq.reshape(shape)


def mixed_logp(teacher_logp: torch.Tensor, student_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """log p~(y_t) = log(alpha * p + (1 - alpha) * q), detached, in at least float32 (``losses.log_mix``). (B, T)"""
    dt = _compute_dtype(torch.promote_types(teacher_logp.dtype, student_logp.dtype))
    return log_mix(teacher_logp.detach().to(dt), student_logp.detach().to(dt), alpha)


def step_importance_weights(student_logp: torch.Tensor, mix_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paper's per-step weight w_t = q(y_t)/p~(y_t) (<= 1/(1-a)), detached, 0 at padding. (B, T)"""
    valid = mask.bool()
    dt = _compute_dtype(student_logp.dtype)
    logw = student_logp.detach().to(dt) - mix_logp.detach().to(dt)
    return torch.where(valid, logw.exp(), torch.zeros((), dtype=dt, device=logw.device))


class SequenceWeights(NamedTuple):
    """Exact importance weights for y ~ p~ (all detached, 0 at padding).

    single_step: (B, T) prod_{t'<t} w_t' (prefix product; weight of the single-step term at t).
    long_term:   (B, T) prod_{t' != t} w_t' (multiply into the advantage; pg_loss's ratio
                 q/p~ supplies w_t, so the long-term term gets the whole-sequence product).
    sequence:    (B,) prod_{all valid t'} w_t' = q(y)/p~(y).
    """

    single_step: torch.Tensor
    long_term: torch.Tensor
    sequence: torch.Tensor


def sequence_importance_weights(
    student_logp: torch.Tensor, mix_logp: torch.Tensor, mask: torch.Tensor
) -> SequenceWeights:
    """Exact (cumulative-product) importance weights; see :class:`SequenceWeights`.

    Computed in log space; still grows like (1/(1-a))^T, so use for short responses or checks.
    """
    valid = mask.bool()  # (B, T)
    dt = _compute_dtype(student_logp.dtype)
    zero = torch.zeros((), dtype=dt, device=student_logp.device)
    logw = torch.where(valid, student_logp.detach().to(dt) - mix_logp.detach().to(dt), zero)
    prefix = torch.cumsum(logw, dim=-1) - logw  # (B, T) sum_{t'<t}
    total = logw.sum(-1)  # (B,)
    single = torch.where(valid, prefix.exp(), zero)
    long_term = torch.where(valid, (total[:, None] - logw).exp(), zero)
    return SequenceWeights(single, long_term, total.exp())


def single_step_weights(
    student_logp: torch.Tensor, mix_logp: torch.Tensor, mask: torch.Tensor, importance: str = "step"
) -> torch.Tensor:
    """Importance weight of the single-step term at t for y ~ p~, detached, 0 at padding. (B, T)

    ``"step"``: the paper's per-step w_t = q(y_t)/p~(y_t) (biased at a > 0, bounded);
    ``"exact"``: the prefix product prod_{t'<t} w_t' (``SequenceWeights.single_step``), the weight
    that makes the single-step term unbiased (the term at t depends on y_<t only).
    """
    if importance == "step":
        return step_importance_weights(student_logp, mix_logp, mask)
    if importance == "exact":
        return sequence_importance_weights(student_logp, mix_logp, mask).single_step
    raise ValueError(f"importance must be 'step' or 'exact', got {importance!r}")

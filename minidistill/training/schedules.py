"""Schedules: pure functions of the optimizer step (0-based, the index the LR scheduler uses).

The WSD shape is defined once here: ``wsd_phases`` (warm-up, stable, decay step counts) and
``wsd_factor`` (the multiplier at a step). ``loop.make_scheduler`` builds the WSD learning rate
from them (a ``LambdaLR``, bit-identical to transformers' ``warmup_stable_decay``, pinned by
tests/unit/test_schedules.py) and PD's ``wsd`` alpha schedule uses the same two functions, so the LR
and alpha cannot drift apart.

PD's loss is ``(1 - alpha) * L_lm + alpha * L_kd``. ``alpha_at`` gives alpha for the optimizer
step ``step`` (0-based, the same index the LR scheduler uses for that update), from the stage
settings alone, so a resumed run recomputes exactly the alpha it would have had.

Schedules (``alpha`` is the peak value, ``alpha_min`` the floor):
- ``constant``: ``alpha`` at every step.
- ``linear_increase``: ``alpha_min`` at step 0 rising linearly to ``alpha`` at the last step.
- ``linear_decrease``: ``alpha`` at step 0 falling linearly to ``alpha_min`` at the last step.
- ``wsd``: alpha follows the shape of the WSD learning rate of ``loop.make_scheduler``
  (linear warm-up, stable, cosine decay; the same ``wsd_factor``): linear from
  ``alpha_min`` to ``alpha`` over the stage's ``warmup_steps``, ``alpha`` through the stable phase,
  then down towards ``alpha_min`` over the decay phase (``decay_steps``, default 10% of the steps)
  with the same cosine curve as the LR. Exactly:
  ``alpha_min + (alpha - alpha_min) * lr(step) / peak_lr``. This is the PD paper's best setting
  (WSD-alpha with WSD-LR): heavy distillation while the LR is high, the weight handed back to the
  LM loss as the LR anneals.
"""

from __future__ import annotations

import math

ALPHA_SCHEDULES = ("constant", "linear_increase", "linear_decrease", "wsd")


def wsd_phases(total_steps: int, warmup_steps: int, decay_steps: int | None) -> tuple[int, int, int]:
    """(warmup, stable, decay) step counts of a WSD schedule over ``total_steps`` steps
    (``decay_steps`` None: 10% of the steps; the warm-up and decay are clipped to fit)."""
    total = max(1, total_steps)
    warm = min(warmup_steps, total)
    decay = decay_steps if decay_steps is not None else max(1, total // 10)
    decay = min(decay, total - warm)
    return warm, total - warm - decay, decay


def wsd_factor(step: int, warm: int, stable: int, decay: int) -> float:
    """The WSD multiplier at ``step``: linear warm-up from 0, 1, half-cosine decay to 0; 0 after.

    The same floating-point operations as transformers' ``_get_wsd_scheduler_lambda`` with
    linear warm-up, cosine decay, ``min_lr_ratio`` 0 and ``num_cycles`` 0.5, so the LR built from
    it is bit-identical to ``get_scheduler("warmup_stable_decay", ...)``."""
    if step < warm:
        return float(step) / float(max(1, warm))
    if step < warm + stable:
        return 1.0
    if step < warm + stable + decay:
        progress = float(step - warm - stable) / float(max(1, decay))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 0.0


def linear_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0, ``end`` at step ``total_steps - 1``, linear between (clamped outside)."""
    if total_steps <= 1:
        return end
    t = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * t


def alpha_at(
    step: int,
    total_steps: int,
    *,
    schedule: str = "constant",
    alpha: float = 0.9,
    alpha_min: float = 0.0,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
) -> float:
    """The KD weight for optimizer step ``step`` (0-based) of ``total_steps``."""
    if schedule == "constant":
        return float(alpha)
    if schedule == "linear_increase":
        return linear_ramp(step, total_steps, alpha_min, alpha)
    if schedule == "linear_decrease":
        return linear_ramp(step, total_steps, alpha, alpha_min)
    if schedule == "wsd":
        f = wsd_factor(step, *wsd_phases(total_steps, warmup_steps, decay_steps))
        return alpha_min + (alpha - alpha_min) * f
    raise ValueError(f"unknown alpha schedule {schedule!r}; expected one of {ALPHA_SCHEDULES}")

"""The return's optional per-decision importance trace (``advantages.returns(trace=...)``,
``return_importance: truncated`` in the minillm stage; issue 24)."""

from __future__ import annotations

import pytest
import torch

from minidistill.config import build
from minidistill.functional.advantages import returns, truncated_importance_weights
from minidistill.generation.sampler import Rollout
from minidistill.parts import rollouts
from minidistill.stages import minillm


def _mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()


def test_trace_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    c = torch.tensor([[1.0, 0.5, 0.25]])
    m = _mask([3], 3)
    # S_3 = .25 * 3 = .75, S_2 = .5 * (2 + .75) = 1.375; R_{t+1} = S_{t+1}
    got = returns(r, m, length_norm=False, trace=c)
    torch.testing.assert_close(got, torch.tensor([[1.375, 0.75, 0.0]]))
    got = returns(r, m, length_norm=False, include_current=True, trace=c)
    torch.testing.assert_close(got, torch.tensor([[2.375, 2.75, 3.0]]))
    # length normalisation still divides by the number of terms (2, 1, none)
    got = returns(r, m, length_norm=True, trace=c)
    torch.testing.assert_close(got, torch.tensor([[1.375 / 2, 0.75, 0.0]]))
    # gamma: S_3 = .75, S_2 = .5 * (2 + .5 * .75) = 1.1875
    got = returns(r, m, length_norm=False, gamma=0.5, trace=c)
    torch.testing.assert_close(got, torch.tensor([[1.1875, 0.75, 0.0]]))


@pytest.mark.parametrize("include_current", [False, True])
@pytest.mark.parametrize("length_norm", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_trace_of_ones_is_the_plain_return_and_padding_never_counts(include_current, length_norm, gamma):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 7, generator=g)
    m = _mask([7, 3, 1, 5], 7)
    ended = torch.tensor([True, False, True, False])
    kw = dict(gamma=gamma, include_current=include_current, length_norm=length_norm, ended=ended)
    plain = returns(r, m, **kw)
    torch.testing.assert_close(returns(r, m, trace=torch.ones(4, 7), **kw), plain)
    # padding: garbage rewards/factors there, or more padding, change nothing
    c = torch.rand(4, 7, generator=g)
    want = returns(r, m, trace=c, **kw)
    garbage = torch.where(m.bool(), r, torch.full_like(r, 1e6))
    c_garbage = torch.where(m.bool(), c, torch.full_like(c, 7.0))
    torch.testing.assert_close(returns(garbage, m, trace=c_garbage, **kw), want)
    wide = returns(
        torch.nn.functional.pad(r, (0, 5)),
        torch.nn.functional.pad(m, (0, 5)),
        trace=torch.nn.functional.pad(c, (0, 5)),
        **kw,
    )
    torch.testing.assert_close(wide[:, :7], want)
    assert (want[~m.bool()] == 0).all()


def test_truncated_weights_and_the_stage_option():
    lq = torch.log(torch.tensor([[0.5, 0.1, 0.9]]))
    lp = torch.log(torch.tensor([[0.1, 0.9, 0.9]]))
    from minidistill.functional.advantages import mixed_logp

    lm = mixed_logp(lp, lq, 0.2)
    m = _mask([2], 3)
    w = truncated_importance_weights(lq, lm, m)
    # q/p~: .5/.42 > 1 -> 1; .1/.26 = .3846...; padding -> 1
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.1 / 0.26, 1.0]]))
    ro = Rollout(
        prompt_ids=torch.zeros(1, 1, dtype=torch.long),
        prompt_mask=torch.ones(1, 1, dtype=torch.long),
        response_ids=torch.tensor([[5, 6, 0]]),
        response_mask=m,
        student_logp=lq,
        mix_logp=lm,
        teacher_logp=lp,
        ended=torch.tensor([True]),
    )
    on = build(minillm.Config, {"type": "minillm", "lm_coef": 0.0, "return_importance": "truncated"}, "t:")
    off = build(minillm.Config, {"type": "minillm", "lm_coef": 0.0}, "t:")
    assert off.return_importance == "none"
    R_on, R_off = rollouts.advantages_for(on, ro)["returns"], rollouts.advantages_for(off, ro)["returns"]
    r = lp - lq
    torch.testing.assert_close(R_off[0, 0], r[0, 1])  # next-token return of the first token
    torch.testing.assert_close(R_on[0, 0], r[0, 1] * w[0, 1])  # its reward weighted by c_2
    # pure student sampling: q/p~ = 1, the option changes nothing
    a0 = Rollout(**{**ro.__dict__, "mix_logp": lq})
    on.mix_alpha = off.mix_alpha = 0.0
    torch.testing.assert_close(
        rollouts.advantages_for(on, a0)["advantages"], rollouts.advantages_for(off, a0)["advantages"]
    )

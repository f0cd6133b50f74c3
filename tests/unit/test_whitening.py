"""Whitening the long-term advantages is NOT direction-preserving: it divides the long-term term by
std(R) while the single-step term keeps its scale, so the summed update leans away from the true
gradient of KL(q||p). Measured by exact enumeration of a tabular model (tests/unit/test_advantages.py's
harness), at a = 0 with population statistics (the infinite-batch limit of batch whitening)."""

from __future__ import annotations

import torch
from test_advantages import F64, P, V, _enumerate, _exact_kl

from minidistill.functional.advantages import pg_loss, returns, single_step_kl, token_rewards


def _expected_update(theta, teacher, resp, whiten: bool) -> torch.Tensor:
    tokens, mask, rows = resp
    valid = mask.bool()
    s_logits, t_logits = theta[rows], teacher[rows]  # (M, L, V)
    logq = torch.log_softmax(s_logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # (M, L)
    logp = torch.log_softmax(t_logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    lq = logq.detach()
    p_y = (lq * mask).sum(-1).exp()  # (M,) q(y): the expectation's weights (a = 0)
    R = returns(token_rewards(logp, lq, mask), mask, include_current=False, length_norm=False)
    if whiten:  # population mean/std over valid tokens, each response weighted by q(y)
        w = p_y[:, None] * valid
        mu = (w * R).sum() / w.sum()
        sd = ((w * (R - mu) ** 2).sum() / w.sum()).sqrt()
        R = torch.where(valid, (R - mu) / sd, 0.0)
    c = p_y[:, None].expand_as(R)
    ss, _ = single_step_kl(s_logits, t_logits, mask, weights=c)
    pg, _, _ = pg_loss(logq, lq, R * c, mask, clip_eps=None)
    (g,) = torch.autograd.grad(ss + pg, theta)
    return g


def test_whitening_changes_the_update_direction():
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(P, V, generator=gen, dtype=F64).requires_grad_()
    base = torch.randn(P, V, generator=gen, dtype=F64)
    resp = _enumerate()
    cosines = []
    for sharp in (0.5, 1.5, 4.0):  # teachers further from the student: larger std(R)
        teacher = base * sharp
        kl, _ = _exact_kl(theta, teacher, resp)
        (grad_kl,) = torch.autograd.grad(kl, theta)
        plain = _expected_update(theta, teacher, resp, whiten=False)
        torch.testing.assert_close(plain, grad_kl, rtol=1e-9, atol=1e-11)  # the unwhitened estimator is exact
        white = _expected_update(theta, teacher, resp, whiten=True)
        cos = float((white * grad_kl).sum() / (white.norm() * grad_kl.norm()))
        cosines.append(cos)
        print(f"teacher x{sharp}: cosine(whitened update, grad KL) = {cos:.4f}")
    assert all(c > 0.0 for c in cosines) and min(cosines) < 0.99, cosines  # a descent direction, not the gradient's

"""Tests for minidistill.functional.losses against naive from-the-definition float64 references."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minidistill.functional import losses as L
from minidistill.functional.losses import Truncated, token_divergence

D = torch.float64
FULL_KINDS = ["fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tv", "ce", "mse"]
TRUNC_KINDS = ["fkl", "skew_fkl", "skew_rkl", "jsd", "tv", "ce"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- naive references (python loops)


def probs(logp: torch.Tensor) -> list[list[float]]:
    return logp.to(D).exp().tolist()


def ref_kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) if y > 0 else math.inf for x, y in zip(a, b) if x > 0)


def ref_value(kind: str, q: list[float], p: list[float], skew: float, beta: float) -> float:
    """Per-position value for student probs q, teacher probs p (one row), straight from the definitions."""
    if kind == "fkl":
        return ref_kl(p, q)
    if kind == "rkl":
        return ref_kl(q, p)
    if kind == "skew_fkl":
        return ref_kl(p, [skew * x + (1 - skew) * y for x, y in zip(p, q)])
    if kind == "skew_rkl":
        return ref_kl(q, [(1 - skew) * x + skew * y for x, y in zip(p, q)])
    if kind == "jsd":
        if beta == 0:
            return ref_kl(p, q)
        if beta == 1:
            return ref_kl(q, p)
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if kind == "tv":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if kind == "ce":
        return -sum(x * math.log(y) for x, y in zip(p, q) if x > 0)
    raise AssertionError(kind)


def ref_rows(kind: str, s_logits, t_logits, skew=0.1, beta=0.5) -> torch.Tensor:
    """Reference per-row values (N,) from logits (N, V) (mse from raw logits)."""
    if kind == "mse":
        return torch.tensor(
            [
                sum((a - b) ** 2 for a, b in zip(r, t)) / len(r)
                for r, t in zip(s_logits.to(D).tolist(), t_logits.to(D).tolist())
            ],
            dtype=D,
        )
    qs = probs(F.log_softmax(s_logits.to(D), -1))
    ps = probs(F.log_softmax(t_logits.to(D), -1))
    return torch.tensor([ref_value(kind, q, p, skew, beta) for q, p in zip(qs, ps)], dtype=D)


def per_position(kind: str, q_logp, p_logp, skew=0.1, beta=0.5):
    return {
        "fkl": lambda: L.forward_kl(q_logp, p_logp),
        "rkl": lambda: L.reverse_kl(q_logp, p_logp),
        "skew_fkl": lambda: L.skew_forward_kl(q_logp, p_logp, skew),
        "skew_rkl": lambda: L.skew_reverse_kl(q_logp, p_logp, skew),
        "jsd": lambda: L.generalized_jsd(q_logp, p_logp, beta),
        "tv": lambda: L.total_variation(q_logp, p_logp),
        "ce": lambda: L.soft_cross_entropy(q_logp, p_logp),
    }[kind]()


def with_zeros(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Set one random entry per row to -inf (an exact zero probability)."""
    x = x.clone()
    cols = torch.randint(0, x.shape[-1], (x.shape[0],), generator=gen(seed))
    x[torch.arange(x.shape[0]), cols] = -math.inf
    return x


def batch(B=3, T=5, V=11, seed=0, dtype=torch.float32):
    g = gen(seed)
    s = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    t = 2 * torch.randn(B, T, V, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[0, 0] = True
    return s, t, mask


# ---------------------------------------------------------------- per-position divergences


# zeros where the divergence stays finite: teacher zeros for fkl/ce, student zeros for rkl, both otherwise
ZEROS = {"fkl": "t", "ce": "t", "rkl": "s", "skew_fkl": "st", "skew_rkl": "st", "jsd": "st", "tv": "st"}


@pytest.mark.parametrize("kind", list(ZEROS))
@pytest.mark.parametrize("skew,beta", [(0.1, 0.5), (0.37, 0.2)])
def test_per_position_matches_definition(kind, skew, beta):
    g = gen(1)
    s, t = 2 * torch.randn(7, 9, generator=g, dtype=D), 2 * torch.randn(7, 9, generator=g, dtype=D)
    s = with_zeros(s, 2) if "s" in ZEROS[kind] else s
    t = with_zeros(t, 3) if "t" in ZEROS[kind] else t
    got = per_position(kind, F.log_softmax(s, -1), F.log_softmax(t, -1), skew, beta)
    want = ref_rows(kind, s, t, skew, beta)
    assert got.shape == (7,)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_logit_mse_matches_definition():
    g = gen(4)
    s, t = torch.randn(4, 6, generator=g, dtype=D), torch.randn(4, 6, generator=g, dtype=D)
    torch.testing.assert_close(L.logit_mse(s, t), ref_rows("mse", s, t), rtol=1e-12, atol=0)


def test_divergences_zero_iff_equal():
    lp = F.log_softmax(with_zeros(torch.randn(5, 8, generator=gen(5), dtype=D), 6), -1)
    for kind in ["fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tv"]:
        assert per_position(kind, lp, lp).abs().max() < 1e-12, kind
    other = F.log_softmax(torch.randn(5, 8, generator=gen(7), dtype=D), -1)
    for kind in ["fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tv"]:
        assert (per_position(kind, other, F.log_softmax(torch.randn(5, 8, generator=gen(8), dtype=D), -1)) > 0).all()


def test_soft_ce_minus_fkl_is_teacher_entropy():
    g = gen(9)
    q = F.log_softmax(torch.randn(6, 10, generator=g, dtype=D), -1)
    p = F.log_softmax(with_zeros(torch.randn(6, 10, generator=g, dtype=D), 10), -1)
    entropy = torch.tensor([-sum(x * math.log(x) for x in row if x > 0) for row in probs(p)], dtype=D)
    torch.testing.assert_close(L.soft_cross_entropy(q, p) - L.forward_kl(q, p), entropy, rtol=1e-10, atol=1e-12)


def test_skew_zero_is_plain_and_skew_one_is_zero():
    g = gen(11)
    q = F.log_softmax(torch.randn(6, 10, generator=g), -1)
    p = F.log_softmax(torch.randn(6, 10, generator=g), -1)
    assert torch.equal(L.skew_forward_kl(q, p, 0.0), L.forward_kl(q, p))
    assert torch.equal(L.skew_reverse_kl(q, p, 0.0), L.reverse_kl(q, p))
    assert L.skew_forward_kl(q, p, 1.0).abs().max() == 0
    assert L.skew_reverse_kl(q, p, 1.0).abs().max() == 0


def test_jsd_endpoints_and_interior_identity():
    g = gen(12)
    q = F.log_softmax(torch.randn(6, 10, generator=g, dtype=D), -1)
    p = F.log_softmax(torch.randn(6, 10, generator=g, dtype=D), -1)
    assert torch.equal(L.generalized_jsd(q, p, 0.0), L.forward_kl(q, p))
    assert torch.equal(L.generalized_jsd(q, p, 1.0), L.reverse_kl(q, p))
    b = 0.3  # interior: beta * skew_fkl(s=beta) + (1 - beta) * skew_rkl(s=1-beta)
    both = b * L.skew_forward_kl(q, p, b) + (1 - b) * L.skew_reverse_kl(q, p, 1 - b)
    torch.testing.assert_close(L.generalized_jsd(q, p, b), both, rtol=1e-12, atol=1e-14)


def _trl_generalized_jsd():
    """TRL's GKD generalized_jsd_loss, compiled from its source (importing trl takes ~8 s)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        pytest.skip("trl not installed")
    path = Path(spec.origin).parent / "experimental" / "gkd" / "gkd_trainer.py"
    if not path.exists():
        pytest.skip(f"{path} not found")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == "generalized_jsd_loss":
            node.decorator_list = []
            ns = {"torch": torch, "F": F}
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), ns)
            return ns["generalized_jsd_loss"]
    pytest.skip("generalized_jsd_loss not found in trl")


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_convention(beta):
    trl_jsd = _trl_generalized_jsd()
    s, t, mask = batch(2, 4, 7, seed=13)
    labels = torch.where(mask, 1, -100)
    want = trl_jsd(s, t, labels=labels, beta=beta, temperature=1.5, reduction="sum")
    got, count = token_divergence(s, t, mask, "jsd", beta=beta, temperature=1.5, student_temperature=True)
    torch.testing.assert_close(got / 1.5**2, want, rtol=1e-5, atol=1e-6)
    assert count == mask.sum()


# ---------------------------------------------------------------- token_divergence wrapper (full teacher)


@pytest.mark.parametrize("kind", FULL_KINDS)
def test_wrapper_matches_definition_on_valid_positions(kind):
    s, t, mask = batch(seed=14)
    got, count = token_divergence(s, t, mask, kind, skew=0.2, beta=0.4)
    want = ref_rows(kind, s[mask], t[mask], skew=0.2, beta=0.4).sum()
    assert got.dtype == torch.float32 and got.dim() == 0
    assert int(count) == int(mask.sum())
    torch.testing.assert_close(got.to(D), want, rtol=1e-5, atol=1e-5)


def test_fkl_gradient_is_q_minus_p():
    s, t, mask = batch(seed=15)
    s.requires_grad_(True)
    token_divergence(s, t, mask, "fkl")[0].backward()
    want = (s.detach().softmax(-1) - t.softmax(-1)) * mask[..., None]  # d KL(p||softmax(z)) / dz
    torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,truncate", [(k, False) for k in FULL_KINDS] + [(k, True) for k in TRUNC_KINDS])
def test_chunked_equals_unchunked_value_and_grad(kind, truncate):
    s, t, mask = batch(seed=16)
    teacher = L.truncate_top_p_k(t, top_p=0.9, top_k=4) if truncate else t
    results = []
    for chunk in (3, 1000):
        x = s.clone().requires_grad_(True)
        value, _ = token_divergence(x, teacher, mask, kind, temperature=1.3, chunk_size=chunk)
        value.backward()
        results.append((value.detach(), x.grad))
    assert int(mask.sum()) > 3  # several chunks really happen
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)
    assert results[0][1].abs().sum() > 0


@pytest.mark.parametrize("kind", FULL_KINDS)
def test_masked_positions_do_not_matter(kind):
    s, t, mask = batch(seed=17)
    s2, t2 = s.clone(), t.clone()
    noise = torch.randn(s.shape, generator=gen(18)) * 5
    s2[~mask] += noise[~mask]
    t2[~mask] -= noise[~mask]
    a, b = s.clone().requires_grad_(True), s2.clone().requires_grad_(True)
    va, ca = token_divergence(a, t, mask, kind, chunk_size=4)
    vb, cb = token_divergence(b, t2, mask, kind, chunk_size=4)
    (va + vb).backward()
    assert torch.equal(va, vb) and torch.equal(ca, cb)
    assert (a.grad[~mask] == 0).all() and (b.grad[~mask] == 0).all()
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("kind", ["fkl", "skew_fkl", "skew_rkl", "jsd", "tv", "ce"])
def test_teacher_exact_zeros_give_finite_value_and_grad(kind):
    s, t, mask = batch(seed=33)
    t[..., :3] = -math.inf  # three vocab entries with teacher probability exactly 0
    x = s.clone().requires_grad_(True)
    value, _ = token_divergence(x, t, mask, kind, chunk_size=4)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.testing.assert_close(value.to(D), ref_rows(kind, s[mask], t[mask]).sum(), rtol=1e-5, atol=1e-5)


def test_temperature_teacher_only_and_hinton():
    s, t, mask = batch(seed=19)
    tau = 2.5
    got, _ = token_divergence(s, t, mask, "fkl", temperature=tau)
    want = ref_rows("fkl", s[mask], t[mask] / tau).sum()
    torch.testing.assert_close(got.to(D), want, rtol=1e-5, atol=1e-5)
    got, _ = token_divergence(s, t, mask, "fkl", temperature=tau, student_temperature=True)
    want = tau**2 * ref_rows("fkl", s[mask] / tau, t[mask] / tau).sum()
    torch.testing.assert_close(got.to(D), want, rtol=1e-5, atol=1e-5)
    plain, _ = token_divergence(s, t, mask, "fkl")
    assert not torch.isclose(plain, got)


def test_empty_mask_gives_zero_with_graph():
    s, t, mask = batch(seed=20)
    x = s.clone().requires_grad_(True)
    value, count = token_divergence(x, t, torch.zeros_like(mask), "jsd")
    value.backward()
    assert value.item() == 0 and int(count) == 0
    assert x.grad is not None and (x.grad == 0).all()


def test_bf16_student_accepted():
    s, t, mask = batch(seed=21)
    x = s.bfloat16().requires_grad_(True)
    value, _ = token_divergence(x, t, mask, "skew_rkl", chunk_size=4)
    value.backward()
    want, _ = token_divergence(s.bfloat16().float(), t, mask, "skew_rkl")
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6)
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all() and x.grad.abs().sum() > 0


def test_bad_arguments_raise():
    s, t, mask = batch(seed=22)
    with pytest.raises(ValueError, match="unknown divergence kind"):
        token_divergence(s, t, mask, "kl")
    with pytest.raises(ValueError, match="skew"):
        token_divergence(s, t, mask, "skew_fkl", skew=1.5)
    with pytest.raises(ValueError, match="mask shape"):
        token_divergence(s, t, mask[:, :-1], "fkl")


# ---------------------------------------------------------------- truncated teacher


def full_as_truncated(t: torch.Tensor, seed: int) -> Truncated:
    """Keep all V tokens in a shuffled order, log-probs shifted by a per-position constant."""
    B, T, V = t.shape
    g = gen(seed)
    order = torch.stack([torch.randperm(V, generator=g) for _ in range(B * T)]).view(B, T, V)
    shift = 3 * torch.randn(B, T, 1, generator=g)
    return Truncated(order.int(), F.log_softmax(t, -1).gather(-1, order) + shift)


def expand(tr: Truncated, V: int) -> torch.Tensor:
    """Truncated teacher -> full-vocab log-probs with -inf (exact zeros) outside the kept set."""
    out = torch.full(tr.indices.shape[:2] + (V,), -math.inf)
    for b, t, k in torch.nonzero(tr.logprobs > -math.inf).tolist():
        out[b, t, tr.indices[b, t, k]] = tr.logprobs[b, t, k]
    return out


@pytest.mark.parametrize("kind,beta", [(k, 0.5) for k in TRUNC_KINDS] + [("jsd", 0.0)])
@pytest.mark.parametrize("student_temperature", [False, True])
def test_truncated_keeping_all_tokens_equals_full(kind, beta, student_temperature):
    s, t, mask = batch(seed=23)
    kw = dict(temperature=1.7, student_temperature=student_temperature, skew=0.2, beta=beta, chunk_size=4)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    full, c1 = token_divergence(a, t, mask, kind, **kw)
    trunc, c2 = token_divergence(b, full_as_truncated(t, 24), mask, kind, **kw)
    (full + trunc).backward()
    torch.testing.assert_close(trunc, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(c1, c2)


@pytest.mark.parametrize("kind", TRUNC_KINDS)
def test_truncated_equals_definition_with_zeros_outside(kind):
    s, t, mask = batch(seed=25)
    tr = L.truncate_top_p_k(t, top_p=0.8, top_k=5)
    assert (tr.logprobs == -math.inf).any()  # some padding slots are really exercised
    tau = 1.4
    got, _ = token_divergence(s, tr, mask, kind, temperature=tau, skew=0.3, beta=0.6)
    teacher = expand(tr, s.shape[-1])[mask] / tau  # (N, V), exact zeros outside the kept set
    want = ref_rows(kind, s[mask], teacher, skew=0.3, beta=0.6).sum()
    torch.testing.assert_close(got.to(D), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,kw", [("rkl", {}), ("jsd", {"beta": 1.0}), ("skew_rkl", {"skew": 0.0}), ("mse", {})])
def test_truncated_unsupported_kinds_raise(kind, kw):
    s, t, mask = batch(seed=26)
    with pytest.raises(ValueError, match="reverse KL|full teacher logits"):
        token_divergence(s, L.truncate_top_p_k(t, top_k=4), mask, kind, **kw)


# ---------------------------------------------------------------- truncate_top_p_k / kept_mass


def ref_kept(p: list[float], top_p: float, top_k: int) -> set[int]:
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = [], 0.0
    for i in order:
        if len(kept) == top_k or (kept and mass >= top_p):
            break
        kept.append(i)
        mass += p[i]
    return set(kept)


def kept_set(tr: Truncated, b: int, t: int) -> set[int]:
    return {int(i) for i, lp in zip(tr.indices[b, t], tr.logprobs[b, t]) if lp > -math.inf}


@pytest.mark.parametrize(
    "top_p,top_k,want",
    [
        (0.4, 50, {2}),
        (0.75, 50, {2, 0}),
        (0.85, 50, {2, 0, 3}),
        (0.97, 50, {2, 0, 3, 1}),
        (0.85, 2, {2, 0}),
        (1.0, 1, {2}),
        (1.0, 4, {0, 1, 2, 3}),
    ],
)
def test_truncation_hand_built(top_p, top_k, want):
    p = torch.tensor([0.3, 0.05, 0.5, 0.15])
    tr = L.truncate_top_p_k(p.log().view(1, 1, 4) + 7.0, top_p=top_p, top_k=top_k)
    assert tr.indices.shape == tr.logprobs.shape == (1, 1, top_k)
    assert kept_set(tr, 0, 0) == want == ref_kept(p.tolist(), top_p, top_k)
    z = sum(p[i] for i in want)
    for i, lp in zip(tr.indices[0, 0].tolist(), tr.logprobs[0, 0].tolist()):
        if lp > -math.inf:
            assert lp == pytest.approx(math.log(p[i] / z), abs=1e-6)
        else:
            assert i == 0


def test_truncation_random_against_reference():
    t = 2 * torch.randn(3, 6, 13, generator=gen(27))
    for top_p, top_k in [(0.5, 5), (0.9, 8), (0.99, 3), (1.0, 13), (0.7, 1)]:
        tr = L.truncate_top_p_k(t, top_p=top_p, top_k=top_k)
        assert tr.indices.shape == (3, 6, top_k)
        torch.testing.assert_close(tr.logprobs.exp().sum(-1), torch.ones(3, 6))
        p = t.softmax(-1)
        for b in range(3):
            for i in range(6):
                assert kept_set(tr, b, i) == ref_kept(p[b, i].tolist(), top_p, top_k)
    everything = L.truncate_top_p_k(t, top_p=1.0, top_k=13)
    assert (everything.logprobs > -math.inf).all()
    argmax = L.truncate_top_p_k(t, top_p=0.95, top_k=1)
    assert torch.equal(argmax.indices[..., 0], t.argmax(-1)) and (argmax.logprobs == 0).all()


def test_truncation_pads_to_top_k_when_vocab_is_smaller():
    t = torch.randn(2, 3, 4, generator=gen(28))
    tr = L.truncate_top_p_k(t, top_p=1.0, top_k=6)
    assert tr.indices.shape == (2, 3, 6)
    assert (tr.logprobs[..., 4:] == -math.inf).all() and (tr.indices[..., 4:] == 0).all()
    torch.testing.assert_close(expand(tr, 4), F.log_softmax(t, -1))


def test_kept_mass():
    s, t, _ = batch(seed=29)
    tr = L.truncate_top_p_k(t, top_p=0.7, top_k=4)
    for logits in (t, s):
        p = logits.softmax(-1)
        want = torch.tensor(
            [[sum(p[b, i, j].item() for j in kept_set(tr, b, i)) for i in range(t.shape[1])] for b in range(t.shape[0])]
        )
        torch.testing.assert_close(L.kept_mass(logits, tr), want)
    assert (L.kept_mass(t, tr) >= 0.7 - 1e-6).any()
    torch.testing.assert_close(L.kept_mass(s, full_as_truncated(t, 30)), torch.ones(t.shape[:2]))


# ---------------------------------------------------------------- lm_loss


def test_lm_loss_matches_definition_chunked_and_masked():
    s, _, mask = batch(seed=31)
    labels = torch.randint(0, s.shape[-1], mask.shape, generator=gen(32))
    labels[~mask] = -100
    lq = F.log_softmax(s.to(D), -1)
    want = -sum(lq[b, i, labels[b, i]].item() for b, i in torch.nonzero(mask).tolist())
    grads = []
    for chunk in (3, 1000):
        x = s.clone().requires_grad_(True)
        value, count = L.lm_loss(x, labels, mask, chunk_size=chunk)
        value.backward()
        grads.append(x.grad)
        assert value.item() == pytest.approx(want, rel=1e-5)
        assert int(count) == int(mask.sum())
    torch.testing.assert_close(grads[0], grads[1])
    onehot = F.one_hot(labels.clamp_min(0), s.shape[-1]).float()
    torch.testing.assert_close(grads[0], (s.softmax(-1) - onehot) * mask[..., None], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- fused forward KL + cross-entropy (L_PT)


def _fkl_ce_reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, m: torch.Tensor):
    """From the definitions, float64, position by position."""
    kl = ce = 0.0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not m[b, i]:
                continue
            lq, lp = F.log_softmax(s[b, i].to(D), -1), F.log_softmax(t[b, i].to(D), -1)
            p = lp.exp()
            kl = kl + torch.where(p > 0, p * (lp - lq), 0.0).sum()  # 0 log 0 = 0
            ce = ce - lq[y[b, i]]
    return kl, ce


def test_forward_kl_and_ce_matches_definitions_values_and_gradients():
    g = gen(11)
    s = torch.randn(3, 5, 9, generator=g, dtype=D, requires_grad=True)
    t = torch.randn(3, 5, 9, generator=g, dtype=D)
    t[0, 1, 4] = float("-inf")  # a zero-probability teacher token: 0 log 0 = 0, no NaN
    y = torch.randint(0, 9, (3, 5), generator=g)
    m = torch.ones(3, 5, dtype=torch.bool)
    m[1, 3:] = False
    m[2, 0] = False
    kl, ce, n = L.forward_kl_and_ce(s, t, y, m, chunk_size=4)
    kl_ref, ce_ref = _fkl_ce_reference(s, t, y, m)
    assert int(n) == int(m.sum())
    torch.testing.assert_close(kl, kl_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-12, atol=1e-12)
    g_fused = torch.autograd.grad(0.3 * kl + 0.7 * ce, s)[0]
    g_ref = torch.autograd.grad(0.3 * kl_ref + 0.7 * ce_ref, s)[0]
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.all(g_fused[~m] == 0)  # padding gets no gradient
    assert torch.autograd.gradcheck(
        lambda x: L.forward_kl_and_ce(x, t, y, m, chunk_size=2)[:2], (s.detach().requires_grad_(),)
    )


def test_forward_kl_and_ce_equals_the_separate_losses_in_bf16_and_never_reads_padding():
    g = gen(12)
    s = torch.randn(2, 6, 40, generator=g).to(torch.bfloat16)
    t = torch.randn(2, 6, 40, generator=g).to(torch.bfloat16)
    y = torch.randint(0, 40, (2, 6), generator=g)
    m = torch.ones(2, 6, dtype=torch.bool)
    m[1, 4:] = False
    ref_s = s.clone().requires_grad_()
    kd_ref, _ = token_divergence(ref_s, t, m, "fkl")
    ce_ref, _ = L.lm_loss(ref_s, y, m)
    (kd_ref + 2 * ce_ref).backward()
    s_nan = s.clone()
    s_nan[1, 4:] = float("nan")  # padding positions may hold anything
    y_bad = y.clone()
    y_bad[1, 4:] = -100
    s_nan.requires_grad_()
    kd, ce, _ = L.forward_kl_and_ce(s_nan, t, y_bad, m, chunk_size=3)
    (kd + 2 * ce).backward()
    torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-5)
    assert s_nan.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s_nan.grad[m].float(), ref_s.grad[m].float(), rtol=2e-2, atol=1e-3)
    assert torch.all(s_nan.grad[~m] == 0)


# ---------------------------------------------------------------- ce_and_divergence (KD, PD, L_PT)


def _ce_div_reference(kind, s, teacher, y, mask, vocab, tau, student_temperature, skew, beta):
    """float64 autograd reference from the per-position definitions: CE over the whole head, the
    divergence over the first ``vocab`` logits (truncated teacher: -inf outside the kept set)."""
    s64 = s.to(D)
    lq_full = F.log_softmax(s64, -1)[mask]  # (N, Vs)
    ce = -lq_full.gather(-1, y[mask][:, None]).sum()
    sd = s64[..., :vocab][mask]
    t = (expand(teacher, vocab) if isinstance(teacher, Truncated) else teacher[..., :vocab]).to(D)[mask]
    if kind == "mse":
        div = ((sd / tau if student_temperature else sd) - t / tau).pow(2).mean(-1).sum()
    else:
        lq = F.log_softmax(sd / tau if student_temperature else sd, -1)
        div = per_position(kind, lq, F.log_softmax(t / tau, -1), skew, beta).sum()
    return ce, div * (tau**2 if student_temperature else 1.0)


@pytest.mark.parametrize(
    "kind,truncate,tau,student_temperature,pad",
    [
        ("fkl", False, 1.0, False, 0),  # the fused kernel
        ("fkl", False, 1.0, False, 3),  # padded head: CE over the head, KL over the vocabulary
        ("fkl", False, 1.7, True, 0),
        ("rkl", False, 1.0, False, 3),
        ("skew_fkl", False, 1.3, False, 0),
        ("skew_rkl", False, 1.0, True, 2),
        ("jsd", False, 0.8, False, 0),
        ("tv", False, 1.0, False, 0),
        ("ce", False, 1.5, False, 0),
        ("mse", False, 1.2, True, 0),
        ("fkl", True, 1.0, False, 0),
        ("fkl", True, 2.0, True, 0),
        ("skew_fkl", True, 1.0, False, 0),
        ("skew_rkl", True, 1.4, False, 2),
        ("jsd", True, 1.0, False, 0),
        ("tv", True, 1.0, False, 0),
        ("ce", True, 0.7, False, 0),
    ],
)
def test_ce_and_divergence_matches_definitions(kind, truncate, tau, student_temperature, pad):
    s, t, mask = batch(seed=31)
    V = s.shape[-1]
    s = torch.cat([s, 2 * torch.randn(*s.shape[:2], pad, generator=gen(32))], -1).requires_grad_(True)
    y = torch.randint(0, V + pad, mask.shape, generator=gen(33)).masked_fill(~mask, -100)
    teacher = L.truncate_top_p_k(t, top_p=0.8, top_k=5) if truncate else t
    kw = dict(temperature=tau, student_temperature=student_temperature, skew=0.3, beta=0.6)
    r = L.ce_and_divergence(s, teacher, y, mask, kind, vocab=V, chunk_size=4, **kw)
    ce_ref, div_ref = _ce_div_reference(kind, s, teacher, y, mask, V, tau, student_temperature, 0.3, 0.6)
    assert int(r.count) == int(mask.sum())
    torch.testing.assert_close(r.ce.to(D), ce_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.divergence.to(D), div_ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(0.4 * r.ce + 0.6 * r.divergence, s)[0]
    g_ref = torch.autograd.grad(0.4 * ce_ref + 0.6 * div_ref, s)[0]
    torch.testing.assert_close(g.to(D), g_ref.to(D), rtol=1e-4, atol=1e-6)
    assert torch.all(g[~mask] == 0)  # padding gets no gradient
    if truncate and not student_temperature:
        want = L.kept_mass(s.detach()[..., :V], teacher)[mask].sum()
        torch.testing.assert_close(r.student_kept, want, rtol=1e-5, atol=1e-6)
    else:
        assert r.student_kept is None


def test_ce_and_divergence_wrappers_and_edges():
    s, t, mask = batch(seed=34)
    y = torch.randint(0, s.shape[-1], mask.shape, generator=gen(35))
    r = L.ce_and_divergence(s, t, y, mask, "jsd", beta=0.3, chunk_size=4)
    assert torch.equal(r.divergence, token_divergence(s, t, mask, "jsd", beta=0.3, chunk_size=4)[0])
    assert torch.equal(r.ce, L.lm_loss(s, y, mask, chunk_size=4)[0])
    kl, ce, n = L.forward_kl_and_ce(s, t, y, mask, chunk_size=4)
    fused = L.ce_and_divergence(s, t, y, mask, "fkl", chunk_size=4)
    assert torch.equal(kl, fused.divergence) and torch.equal(ce, fused.ce) and torch.equal(n, fused.count)
    only_ce = L.ce_and_divergence(s, None, y, mask)
    assert only_ce.divergence is None and only_ce.student_kept is None
    x = s.clone().requires_grad_(True)
    empty = L.ce_and_divergence(x, t, y, torch.zeros_like(mask), "skew_rkl")
    assert float(empty.ce) == 0 and float(empty.divergence) == 0 and int(empty.count) == 0
    (empty.ce + empty.divergence).backward()  # still connected to the graph
    with pytest.raises(ValueError, match="labels"):
        L.ce_and_divergence(s, None, None, mask)
    with pytest.raises(ValueError, match="reverse KL"):
        L.ce_and_divergence(s, L.truncate_top_p_k(t, top_k=4), y, mask, "rkl")
    with pytest.raises(ValueError, match="vocab"):
        L.ce_and_divergence(s, t, y, mask, vocab=s.shape[-1] + 1)

"""Tests for minidistill.generation.sampler (tiny random Llama models built in-process)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minidistill.generation.sampler import Rollout, process_logits, sample

V = 64
PAD = 0


def tiny_llama(seed: int, layers: int = 2, init: float = 0.3) -> LlamaForCausalLM:
    """A random tiny Llama; a larger init range makes next-token distributions peaked."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        initializer_range=init,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    return tiny_llama(0, layers=2), tiny_llama(1, layers=3)


def left_padded_prompts(pads: list[int], P: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts (B, P) with ``pads[i]`` left-padding tokens in row i."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (len(pads), P), generator=g)  # (B, P)
    mask = torch.ones_like(ids)  # (B, P)
    for i, n in enumerate(pads):
        ids[i, :n], mask[i, :n] = PAD, 0
    return ids, mask


def full_forward_logps(model, r: Rollout, **proc) -> torch.Tensor:
    """log-softmax of processed logits predicting each response token, no cache. # (B, T, V)"""
    ids = torch.cat([r.prompt_ids, r.response_ids], 1)  # (B, P + T)
    mask = torch.cat([r.prompt_mask, r.response_mask], 1)  # (B, P + T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P + T)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # (B, P+T, V)
    P, T = r.prompt_ids.shape[1], r.response_ids.shape[1]
    return torch.log_softmax(process_logits(logits[:, P - 1 : P - 1 + T], **proc), -1)


def assert_close_with_inf(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    """Equal -inf pattern and close finite values."""
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(a)
    torch.testing.assert_close(a[fin], b[fin], atol=atol, rtol=0)


def run(models, ids, mask, seed=0, **kw) -> Rollout:
    student, teacher = models
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("eos_token_id", 2)
    return sample(student, teacher, ids, mask, pad_token_id=PAD, generator=torch.Generator().manual_seed(seed), **kw)


# --- KV cache + left padding -----------------------------------------------------------------


@pytest.mark.parametrize(
    "alpha, proc",
    [
        (0.0, {}),
        (0.2, {}),
        (0.2, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}),
    ],
)
def test_logps_match_uncached_forward(models, alpha, proc):
    ids, mask = left_padded_prompts([0, 3, 6, 1, 4])
    r = run(models, ids, mask, max_new_tokens=16, mix_alpha=alpha, **proc)
    valid = r.response_mask.bool()  # (B, T)
    tok = r.response_ids[..., None]  # (B, T, 1)
    logq = full_forward_logps(models[0], r, **proc)  # (B, T, V)
    logp = full_forward_logps(models[1], r, **proc)  # (B, T, V)
    sq = logq.gather(-1, tok)[..., 0]  # (B, T)
    sp = logp.gather(-1, tok)[..., 0]  # (B, T)
    assert_close_with_inf(r.student_logp[valid], sq[valid], atol=1e-4)
    assert_close_with_inf(r.teacher_logp[valid], sp[valid], atol=1e-4)
    if alpha > 0:
        mix = torch.log(alpha * sp.exp() + (1 - alpha) * sq.exp())
        assert_close_with_inf(r.mix_logp[valid], mix[valid], atol=1e-4)
    else:
        assert torch.equal(r.mix_logp, r.student_logp)
    for name in ("student_logp", "mix_logp", "teacher_logp"):
        assert getattr(r, name).dtype == torch.float32


# --- padding / EOS ---------------------------------------------------------------------------


def test_eos_stops_rows_and_pads(models):
    ids, mask = left_padded_prompts([0, 2, 5, 1, 3, 0, 4, 2])
    eos = list(range(40, 52))  # ~19% of the vocabulary: rows stop at varied steps
    r = run(models, ids, mask, seed=3, max_new_tokens=30, eos_token_id=eos)
    B, T = r.response_ids.shape
    lengths = r.response_mask.sum(-1)  # (B,)
    assert T == int(lengths.max())  # T is the longest response, not max_new_tokens
    assert T <= 30 and int(lengths.min()) < T  # some rows stopped early
    # valid tokens form a prefix
    assert torch.equal(r.response_mask, r.response_mask.cummin(-1).values)
    is_eos = torch.isin(r.response_ids, torch.tensor(eos))
    for i in range(B):
        n = int(lengths[i])
        assert n >= 1
        if n < 30:  # stopped by EOS: the last valid token is an EOS, the only one
            assert bool(is_eos[i, n - 1])
        assert not bool(is_eos[i, : n - 1].any())
        assert bool((r.response_ids[i, n:] == PAD).all())
    pad = r.response_mask == 0
    for name in ("student_logp", "mix_logp", "teacher_logp"):
        lp = getattr(r, name)
        assert bool((lp[pad] == 0).all())
        assert bool((lp[~pad] < 0).all())


def test_no_eos_runs_to_max_new_tokens(models):
    ids, mask = left_padded_prompts([0, 3])
    r = run(models, ids, mask, max_new_tokens=7, eos_token_id=V + 5)  # unreachable EOS
    assert r.response_ids.shape == (2, 7)
    assert bool(r.response_mask.all())


# --- mixture ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.2, 0.0, 1.0])
def test_first_token_frequencies_match_mixture(models, alpha):
    student, teacher = models
    N = 20000
    prompt = torch.tensor([[PAD, PAD, 7, 11, 13, 17]])
    pmask = (prompt != PAD).long()
    r = run(models, prompt.expand(N, -1), pmask.expand(N, -1), seed=11,
            max_new_tokens=1, mix_alpha=alpha, eos_token_id=2)  # fmt: skip
    assert r.response_ids.shape == (N, 1)
    pos = (pmask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        q = student(input_ids=prompt, attention_mask=pmask, position_ids=pos).logits[0, -1].softmax(-1)
        p = teacher(input_ids=prompt, attention_mask=pmask, position_ids=pos).logits[0, -1].softmax(-1)
    expected = alpha * p + (1 - alpha) * q  # (V,)
    freq = torch.bincount(r.response_ids[:, 0], minlength=V).double() / N  # (V,)
    bound = 5 * torch.sqrt(expected * (1 - expected) / N) + 2.0 / N  # ~5 sigma per token
    assert bool(((freq - expected).abs() <= bound).all()), (freq - expected).abs().max()
    # The models differ enough that the test can tell the mixture from either model.
    for other in (p, q):
        if not torch.allclose(other, expected):
            assert bool(((freq - other).abs() > 5 * torch.sqrt(other * (1 - other) / N) + 2.0 / N).any())
    # and the recorded log-probs are those of the sampled token
    y = r.response_ids[:, 0]
    torch.testing.assert_close(r.student_logp[:, 0], q.log()[y], atol=1e-4, rtol=0)
    torch.testing.assert_close(r.teacher_logp[:, 0], p.log()[y], atol=1e-4, rtol=0)


@pytest.mark.parametrize("alpha", [0.2, 0.5, 1.0])
def test_mix_logp_is_log_of_mixture(models, alpha):
    ids, mask = left_padded_prompts([1, 0, 3])
    r = run(models, ids, mask, max_new_tokens=10, mix_alpha=alpha)
    valid = r.response_mask.bool()
    expect = torch.log(alpha * r.teacher_logp.exp() + (1 - alpha) * r.student_logp.exp())
    torch.testing.assert_close(r.mix_logp[valid], expect[valid], atol=1e-5, rtol=1e-5)
    # importance weight q / p~ never exceeds 1 / (1 - a)
    if alpha < 1:
        w = (r.student_logp - r.mix_logp)[valid].exp()
        assert bool((w <= 1 / (1 - alpha) + 1e-5).all())


# --- process_logits --------------------------------------------------------------------------


def support(x: torch.Tensor) -> set[int]:
    return set(torch.isfinite(x).nonzero()[:, -1].tolist())


def test_process_logits_identity_by_default():
    x = torch.randn(3, 5, V)
    assert torch.equal(process_logits(x), x)
    assert process_logits(x.to(torch.bfloat16)).dtype == torch.float32


def test_process_logits_top_k_top_p_temperature():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.25, 0.1])  # ties at 0.1 (ids 2 and 4)
    x = probs.log()[None]  # (1, 5)
    assert support(process_logits(x, top_k=1)) == {1}
    assert support(process_logits(x, top_k=2)) == {1, 3}
    assert support(process_logits(x, top_k=3)) == {1, 3, 2, 4}  # ties with the k-th are kept
    assert support(process_logits(x, top_p=0.4)) == {1}
    assert support(process_logits(x, top_p=0.6)) == {1, 3}
    assert support(process_logits(x, top_p=0.9)) == {1, 3, 2, 4}
    assert support(process_logits(x, top_p=0.99)) == {0, 1, 2, 3, 4}
    # temperature divides the logits, and comes before top-p (it changes the nucleus)
    torch.testing.assert_close(process_logits(x, temperature=2.0), x / 2)
    assert support(process_logits(x, temperature=0.25, top_p=0.9)) == {1}
    kept = process_logits(x, top_k=2)
    torch.testing.assert_close(kept.softmax(-1)[0, [1, 3]], torch.tensor([2 / 3, 1 / 3]))
    with pytest.raises(ValueError):
        process_logits(x, temperature=0.0)
    with pytest.raises(ValueError):
        process_logits(x, top_p=0.0)
    with pytest.raises(ValueError):
        process_logits(x, top_k=-1)


def test_process_logits_batched_3d_and_grad():
    x = torch.randn(2, 4, V, requires_grad=True)
    y = process_logits(x, temperature=0.8, top_k=10, top_p=0.7)  # (B, T, V) as in training
    rows = torch.stack([process_logits(r, temperature=0.8, top_k=10, top_p=0.7) for r in x.reshape(-1, V)])
    assert torch.equal(y.reshape(-1, V), rows)
    torch.log_softmax(y, -1)[..., 0].clamp(min=-1e4).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --- reproducibility and the finished-row optimisation ---------------------------------------


def assert_rollouts_equal(a: Rollout, b: Rollout, atol: float = 0.0) -> None:
    for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for f in ("student_logp", "mix_logp", "teacher_logp"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), atol=atol, rtol=0)


def test_same_seed_same_rollout(models):
    ids, mask = left_padded_prompts([2, 0, 1, 5])
    a = run(models, ids, mask, seed=5, max_new_tokens=20, eos_token_id=[40, 41, 42, 43])
    b = run(models, ids, mask, seed=5, max_new_tokens=20, eos_token_id=[40, 41, 42, 43])
    c = run(models, ids, mask, seed=6, max_new_tokens=20, eos_token_id=[40, 41, 42, 43])
    assert_rollouts_equal(a, b)
    assert not torch.equal(a.response_ids, c.response_ids) or a.response_ids.shape != c.response_ids.shape


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_skipping_finished_rows_matches_plain_path(models, alpha):
    ids, mask = left_padded_prompts([0, 2, 5, 1, 3, 0, 4, 2, 1, 6])
    kw = dict(max_new_tokens=25, eos_token_id=list(range(40, 50)), mix_alpha=alpha, seed=9)
    fast = run(models, ids, mask, **kw)
    plain = run(models, ids, mask, _skip_finished=False, _last_logits_only=False, **kw)
    lengths = fast.response_mask.sum(-1)
    assert int(lengths.min()) < int(lengths.max())  # rows did finish at different steps
    # Same tokens; log-probs equal up to float32 rounding (smaller batches change GEMM blocking).
    assert_rollouts_equal(fast, plain, atol=1e-5)


# --- Rollout helpers and argument checks -----------------------------------------------------


def test_rollout_select_split_to(models):
    ids, mask = left_padded_prompts([0, 2, 5, 1, 3])
    r = run(models, ids, mask, max_new_tokens=15, eos_token_id=list(range(40, 56)), seed=2)
    parts = r.split(2)
    assert [p.batch_size for p in parts] == [2, 2, 1]
    for k, part in enumerate(parts):
        T = part.response_ids.shape[1]
        assert T == int(part.response_lengths.max())  # trimmed to the minibatch's longest
        torch.testing.assert_close(part.student_logp, r.student_logp[2 * k : 2 * k + 2, :T])
        assert torch.equal(part.prompt_ids, r.prompt_ids[2 * k : 2 * k + 2])
    sel = r.select(torch.tensor([4, 0]))
    assert torch.equal(sel.prompt_ids, r.prompt_ids[[4, 0]])
    assert torch.equal(r.select(r.response_lengths > 0).response_ids, r.response_ids)
    moved = r.to("cpu")
    assert_rollouts_equal(moved, r)


class Wrapper(torch.nn.Module):
    """Stands in for a DDP/accelerate wrapper: the HF model sits in ``.module``."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_wrapped_model_is_unwrapped(models):
    ids, mask = left_padded_prompts([0, 2, 4])
    a = run(models, ids, mask, seed=4)
    b = run((Wrapper(models[0]), models[1]), ids, mask, seed=4)
    assert_rollouts_equal(a, b)


def test_train_flags_restored_and_bad_inputs(models):
    student, teacher = models
    ids, mask = left_padded_prompts([0, 2])
    student.train()
    try:
        run(models, ids, mask, max_new_tokens=2)
        assert student.training and not teacher.training
    finally:
        student.eval()
    right = torch.ones_like(mask)
    right[0, -2:] = 0  # right padding is rejected
    with pytest.raises(ValueError, match="LEFT"):
        run(models, ids, right)
    with pytest.raises(ValueError, match="teacher"):
        sample(student, None, ids, mask, max_new_tokens=2, eos_token_id=2, pad_token_id=PAD)
    with pytest.raises(ValueError):
        run(models, ids, mask, mix_alpha=1.5)

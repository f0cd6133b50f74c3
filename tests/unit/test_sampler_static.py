"""The sampler's static decode path (``decode="static"``/``"compiled"``) against today's dynamic path.

Same generator, same models: the static path (a fixed-shape StaticCache per model, finished rows
kept in the batch and masked) must draw the same tokens and record the same log-probs, up to
float32 rounding (attention over the cache's masked, zero-filled slots sums in another order):
log-probs within 1e-5 absolute, the teacher's hidden states within 1e-5 absolute + relative, tokens, masks and stop flags exact. The eager static path runs in the default
suite; the compiled one (torch.compile on CPU: ~20-30 s of compilation) is marked slow.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_sampler import PAD, V, left_padded_prompts, tiny_llama
from transformers import StaticCache

from minidistill.generation import sampler as sampler_mod
from minidistill.generation.sampler import Rollout, release_static_caches, resolve_decode, sample

ATOL = 1e-5
EOS = list(range(40, 50))  # ~16% of the vocabulary: rows stop at varied steps


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0, layers=2), tiny_llama(1, layers=3)


@pytest.fixture(autouse=True)
def _fresh_caches():
    release_static_caches()
    yield
    release_static_caches()


def draw(models, ids, mask, decode, seed=9, **kw) -> Rollout:
    student, teacher = models
    kw.setdefault("max_new_tokens", 25)
    kw.setdefault("eos_token_id", EOS)
    g = torch.Generator().manual_seed(seed)
    return sample(student, teacher, ids, mask, pad_token_id=PAD, generator=g, decode=decode, **kw)


def assert_same(a: Rollout, b: Rollout, atol: float = ATOL) -> None:
    for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "ended"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for f in ("student_logp", "mix_logp", "teacher_logp"):
        x, y = getattr(a, f), getattr(b, f)
        assert torch.equal(torch.isinf(x), torch.isinf(y)), f
        fin = torch.isfinite(x)
        torch.testing.assert_close(x[fin], y[fin], atol=atol, rtol=0, msg=f)
    assert (a.teacher_hidden is None) == (b.teacher_hidden is None)
    if a.teacher_hidden is not None:
        # hidden states are O(1), not log-probs: the same bound, relative
        torch.testing.assert_close(a.teacher_hidden, b.teacher_hidden, atol=atol, rtol=atol)


PADS = [0, 2, 5, 1, 3, 0, 4, 2, 1, 6]  # left padding per row: prompts of 2..8 tokens


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_static_matches_dynamic(models, alpha):
    ids, mask = left_padded_prompts(PADS)
    dyn = draw(models, ids, mask, "dynamic", mix_alpha=alpha)
    sta = draw(models, ids, mask, "static", mix_alpha=alpha)
    lengths = dyn.response_mask.sum(-1)
    assert int(lengths.min()) < int(lengths.max())  # rows finished at different steps
    assert bool(dyn.ended.any())  # some on EOS
    assert_same(dyn, sta)
    if alpha > 0:
        assert sta.teacher_hidden is not None  # the teacher stepped along and kept its hidden states
        # the stepping teacher really ran on the static path: log p is not a copy of log q
        valid = sta.response_mask.bool()
        assert not torch.allclose(sta.teacher_logp[valid], sta.student_logp[valid])


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_static_matches_dynamic_top_k_top_p(models, alpha):
    ids, mask = left_padded_prompts(PADS, seed=1)
    kw = dict(mix_alpha=alpha, temperature=0.7, top_k=20, top_p=0.9, seed=4)
    dyn = draw(models, ids, mask, "dynamic", **kw)
    sta = draw(models, ids, mask, "static", **kw)
    assert_same(dyn, sta)
    if alpha > 0:  # a teacher draw outside the student's kept set has log q = -inf (same on both paths)
        assert bool(torch.isfinite(sta.teacher_logp[sta.response_mask.bool()]).any())


def test_static_matches_plain_path_without_hidden_states(models):
    """Against the plain path (no row skipping, full-sequence logits) and without the head split."""
    ids, mask = left_padded_prompts(PADS, seed=2)
    kw = dict(mix_alpha=0.2, keep_teacher_hidden=False)
    plain = draw(models, ids, mask, "dynamic", _skip_finished=False, _last_logits_only=False, **kw)
    sta = draw(models, ids, mask, "static", **kw)
    assert sta.teacher_hidden is None
    assert_same(plain, sta)


def test_static_caches_are_reused_and_reset(models):
    """Consecutive calls of other prompt widths (one cache bucket) and batch sizes: each equal to the
    dynamic path, so the reused cache holds nothing of the previous call."""
    student, teacher = models
    for pads, seed in (([0, 3, 1], 1), ([5, 0, 2], 2), ([1, 0, 4, 2, 6], 3), ([0, 3, 1], 4)):
        ids, mask = left_padded_prompts(pads, P=8 + seed, seed=seed)
        dyn = draw(models, ids, mask, "dynamic", mix_alpha=0.2, seed=seed, max_new_tokens=12)
        sta = draw(models, ids, mask, "static", mix_alpha=0.2, seed=seed, max_new_tokens=12)
        assert_same(dyn, sta)
    kept = sampler_mod._STATIC
    assert student in kept and teacher in kept
    # batch 3 and batch 5 (one cache length bucket): two entries per model, reused, not one per call
    assert len(kept[student]) == 2 and len(kept[teacher]) == 2
    release_static_caches(student)
    assert student not in kept and teacher in kept


def test_static_with_narrower_vocab(models):
    """``vocab`` below the head width: no id at or beyond it is drawn, on either path."""
    ids, mask = left_padded_prompts([0, 2, 4, 1])
    kw = dict(mix_alpha=0.2, vocab=V - 14, eos_token_id=[40, 41])
    dyn = draw(models, ids, mask, "dynamic", **kw)
    sta = draw(models, ids, mask, "static", **kw)
    assert_same(dyn, sta)
    assert int(sta.response_ids[sta.response_mask.bool()].max()) < V - 14


def test_cache_length_buckets():
    L = sampler_mod._cache_len
    assert L(3, 10) == 64  # at least 64
    assert L(40, 24) == 64 and L(41, 24) == 128  # a power of two >= prompt + limit
    assert L(100, 256) == 512
    for p in range(1, 300, 7):
        assert L(p, 64) >= p + 64


class NoStatic(torch.nn.Module):
    """A causal-LM stand-in whose class does not declare static-cache/compile support."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, **kw):
        return self.inner(**kw)


def test_resolve_decode(models):
    student, teacher = models
    assert resolve_decode("auto", student, teacher) == "dynamic"  # CPU: today's path
    assert resolve_decode("static", student, teacher) == "static"
    assert resolve_decode("compiled", student, None) == "compiled"
    assert resolve_decode("dynamic", NoStatic(student), teacher) == "dynamic"
    assert resolve_decode("auto", NoStatic(student), teacher) == "dynamic"
    with pytest.raises(ValueError, match="static KV cache"):
        resolve_decode("static", student, NoStatic(teacher))
    ids, mask = left_padded_prompts([0, 1])
    with pytest.raises(ValueError, match="decode"):
        draw(models, ids, mask, "fast")


def test_auto_falls_back_to_dynamic_when_the_static_path_fails(models, monkeypatch):
    """decode auto: a failure of the static/compiled path (here raised on the third decode call,
    after two draws) warns and redraws on the dynamic path from the generator's saved state, so the
    rollout is the dynamic path's; later calls go straight to it. An explicit mode raises."""
    ids, mask = left_padded_prompts(PADS)
    ref = draw(models, ids, mask, "dynamic", mix_alpha=0.2)
    monkeypatch.setattr(sampler_mod, "resolve_decode", lambda d, s, t: "dynamic" if d == "dynamic" else "compiled")
    monkeypatch.setattr(sampler_mod, "_AUTO_FAILED", [])
    original, calls = sampler_mod._StaticStepper.__call__, []

    def flaky(self, ids, mask, pos):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("compiler exploded")
        return original(self, ids, mask, pos)

    monkeypatch.setattr(sampler_mod._StaticStepper, "__call__", flaky)
    monkeypatch.setattr(sampler_mod, "_static_state", lambda *a: sampler_mod._StaticState(
        StaticCache(config=a[0].config, max_cache_len=a[2]), None, False))  # eager, never compiled  # fmt: skip
    with pytest.raises(RuntimeError, match="exploded"):
        draw(models, ids, mask, "compiled", mix_alpha=0.2)
    calls.clear()
    with pytest.warns(RuntimeWarning, match="compiler exploded"):
        got = draw(models, ids, mask, "auto", mix_alpha=0.2)
    assert len(calls) == 3 and sampler_mod._AUTO_FAILED
    assert_same(ref, got)  # the two draws made before the failure were undone
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = draw(models, ids, mask, "auto", mix_alpha=0.2)
    assert not calls  # straight to the dynamic path
    assert_same(ref, again)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_compiled_matches_dynamic(models, alpha):
    """torch.compile of the decode step (inductor on CPU): same tokens, log-probs within 1e-5, and
    a second call with the same shapes reuses the compiled step."""
    ids, mask = left_padded_prompts(PADS)
    dyn = draw(models, ids, mask, "dynamic", mix_alpha=alpha)
    comp = draw(models, ids, mask, "compiled", mix_alpha=alpha)
    assert_same(dyn, comp)
    again = draw(models, ids, mask, "compiled", mix_alpha=alpha)
    assert_same(dyn, again)
    assert all(st.compiled for st in sampler_mod._STATIC[models[0]].values())

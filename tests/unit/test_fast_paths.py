"""The speed-ups give the numbers of the plain paths they replace (tiny random Llamas, fp32).

- sampler at a = 0: the teacher scores finished responses in one pass instead of stepping along;
- the teacher's hidden states kept by the sampler rebuild its logits with the LM head alone;
- response logits through ``logits_to_keep`` equal the full forward's slice;
- the MiniLLM loss and its gradients are the same with cached teacher hidden states.
"""

from __future__ import annotations

import pytest
import torch
from test_sampler import PAD, left_padded_prompts, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from minidistill.config import build
from minidistill.generation.sampler import sample
from minidistill.models import logits as fwd
from minidistill.parts import objectives, rollouts
from minidistill.stages import minillm


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0, layers=2), tiny_llama(1, layers=3)


def _sample(models, alpha, seed=0, **kw):
    ids, mask = left_padded_prompts([0, 3, 5, 1])
    student, teacher = models
    return sample(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=10,
        mix_alpha=alpha,
        eos_token_id=list(range(2, 10)),
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def _batch(ro) -> dict:
    return {f: getattr(ro, f) for f in ro.__dataclass_fields__ if getattr(ro, f) is not None}


def test_teacher_scored_after_equals_teacher_stepping_along(models):
    fast = _sample(models, 0.0)
    plain = _sample(models, 0.0, _teacher_after=False)
    assert fast.response_mask.sum() > 10 and not bool(fast.response_mask.all())  # some rows stopped early
    for f in ("response_ids", "response_mask", "student_logp", "mix_logp"):
        assert torch.equal(getattr(fast, f), getattr(plain, f)), f
    torch.testing.assert_close(fast.teacher_logp, plain.teacher_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.teacher_hidden, plain.teacher_hidden, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_kept_hidden_states_rebuild_the_teacher_logits(models, alpha):
    ro = _sample(models, alpha)
    teacher = models[1]
    assert ro.teacher_hidden is not None and ro.teacher_hidden.shape[:2] == ro.response_ids.shape
    with torch.no_grad():
        full = teacher(
            input_ids=torch.cat([ro.prompt_ids, ro.response_ids], 1),
            attention_mask=torch.cat([ro.prompt_mask, ro.response_mask], 1),
            position_ids=(torch.cat([ro.prompt_mask, ro.response_mask], 1).cumsum(-1) - 1).clamp(min=0),
        ).logits
        P, T = ro.prompt_ids.shape[1], ro.response_ids.shape[1]
        expect = full[:, P - 1 : P - 1 + T]
        got = fwd.head_logits(teacher, ro.teacher_hidden)
    valid = ro.response_mask.bool()
    torch.testing.assert_close(got[valid], expect[valid], atol=1e-4, rtol=1e-4)
    assert torch.all(ro.teacher_hidden[~valid] == 0)


def test_response_logits_keep_only_response_positions(models):
    ro = _sample(models, 0.0)
    model = models[0]
    b = _batch(ro)
    with torch.no_grad():
        got = fwd.response_logits(model, b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"])
        ids = torch.cat([b["prompt_ids"], b["response_ids"]], 1)
        mask = torch.cat([b["prompt_mask"], b["response_mask"]], 1)
        full = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    P, T = b["prompt_ids"].shape[1], b["response_ids"].shape[1]
    torch.testing.assert_close(got, full[:, P - 1 : P - 1 + T], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_minillm_loss_same_with_cached_teacher_hidden(models, alpha):
    student, teacher = tiny_llama(0, layers=2).train(), models[1]
    ro = _sample((student, teacher), alpha)
    cfg = build(minillm.Config, {"type": "minillm", "mix_alpha": alpha}, "test:")
    results = []
    for keep in (True, False):
        b = _batch(ro)
        if not keep:
            b.pop("teacher_hidden")
        b.update(rollouts.advantages_for(cfg, ro))
        b["num_tokens"], b["stats"] = int(b["response_mask"].sum()), {}
        student.zero_grad()
        loss, m = objectives.minillm_loss(student, b, cfg=cfg, teacher=teacher, vocab=student.config.vocab_size)
        loss.backward()
        results.append(
            (loss.detach(), m["single_step_kl"], torch.cat([p.grad.flatten() for p in student.parameters()]))
        )
    (l0, s0, g0), (l1, s1, g1) = results
    assert s0 > 0
    torch.testing.assert_close(l0, l1, atol=1e-5, rtol=1e-5)
    assert s0 == pytest.approx(s1, rel=1e-5)
    torch.testing.assert_close(g0, g1, atol=2e-5, rtol=1e-4)  # fp32 rounding of two routes


def test_split_head_refuses_models_whose_logits_are_not_head_of_hidden(models):
    assert fwd.split_head(models[0]) is not None
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    capped = LlamaForCausalLM(cfg)
    capped.config.final_logit_softcapping = 30.0
    assert fwd.split_head(capped) is None
    wrapped = torch.nn.Module()
    wrapped.module = models[0]
    assert fwd.split_head(wrapped) is None  # a DDP-like wrapper runs through its own forward
    # the sampler then keeps no hidden states and the loss falls back to a teacher forward
    ids, mask = left_padded_prompts([0, 2])
    ro = sample(
        models[0],
        wrapped,
        ids,
        mask,
        max_new_tokens=4,
        mix_alpha=0.2,
        eos_token_id=2,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    assert ro.teacher_hidden is not None  # _unwrap inside sample() reaches the plain model


def test_minillm_loss_same_for_any_chunking(models):
    """Length-sorted chunks without padding columns give the unchunked loss and gradients."""
    student, teacher = tiny_llama(0, layers=2).train(), models[1]
    ro = _sample((student, teacher), 0.2)
    assert len(set(ro.prompt_mask.sum(-1).tolist())) > 1  # prompts of different lengths
    results = []
    for chunk in (1, 3, 64):
        cfg = build(minillm.Config, {"type": "minillm", "chunk_rows": chunk}, "test:")
        b = _batch(ro)
        b.update(rollouts.advantages_for(cfg, ro))
        b["num_tokens"], b["stats"] = int(b["response_mask"].sum()), {}
        student.zero_grad()
        loss, m = objectives.minillm_loss(student, b, cfg=cfg, teacher=teacher, vocab=student.config.vocab_size)
        loss.backward()
        results.append((loss.detach(), m, torch.cat([p.grad.flatten() for p in student.parameters()])))
    for loss, m, g in results[:2]:
        torch.testing.assert_close(loss, results[2][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, results[2][2], atol=2e-5, rtol=1e-4)
        for k in ("pg_loss", "single_step_kl", "clip_frac", "ratio_new_old"):
            assert m[k] == pytest.approx(results[2][1][k], rel=1e-4, abs=1e-6), k

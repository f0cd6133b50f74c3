"""Wiring of the MiniLLM stage: ``advantages_for`` and ``minillm_loss`` against the paper's formulas
written out from scratch on a tiny Llama's teacher-mixed rollouts (a = 0.2).

Each test targets one wiring mistake that the math-level tests in test_advantages.py cannot see:
rho taken against q_old instead of p~, the single-step importance weight dropped, whitening off,
the temperature not reaching the fused KL kernel, the reward sign flipped. Each also checks that
the wrong wiring would give a measurably different number (the test has power).
"""

from __future__ import annotations

import pytest
import torch
from tiny_tokenizer import make_tokenizer, tiny_llama

from minidistill.config import build
from minidistill.data import collate_prompts
from minidistill.functional import advantages as adv
from minidistill.generation.sampler import Rollout, sample
from minidistill.models import logits as fwd
from minidistill.parts import objectives, rollouts
from minidistill.stages import minillm

F64 = torch.float64


def cfg_of(**kw) -> minillm.Config:
    base = {"type": "minillm", "name": "minillm", "lm_coef": 0.0, "mix_alpha": 0.2}
    base.update(kw)
    return build(minillm.Config, base, "test:")


@pytest.fixture(scope="module")
def models():
    tok = make_tokenizer()
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    with torch.no_grad():  # a peaked teacher: rewards and importance weights far from 0 and 1
        teacher.get_input_embeddings().weight.mul_(6.0)
    return tok, student, teacher


def _rollouts(models, temperature=1.0, seed=0) -> Rollout:
    tok, student, teacher = models
    prompts = [
        tok("Say hi").input_ids,
        tok("A longer prompt here").input_ids,
        tok("Q").input_ids,
        tok("Name a fruit.").input_ids,
    ]
    ids, mask = collate_prompts(prompts, tok.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    return sample(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=6,
        mix_alpha=0.2,
        temperature=temperature,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=g,
    )


def _batch(cfg, ro: Rollout) -> dict:
    batch = {f: getattr(ro, f) for f in ro.__dataclass_fields__ if getattr(ro, f) is not None}
    batch.update(rollouts.advantages_for(cfg, ro))
    batch["num_tokens"], batch["stats"] = int(batch["response_mask"].sum()), {}
    return batch


def _stage_loss(models, cfg, batch):
    """(loss, metrics, grads of every student parameter) of the stage's minillm_loss."""
    _, student, teacher = models
    student.zero_grad(set_to_none=True)
    loss, metrics = objectives.minillm_loss(student, batch, cfg=cfg, teacher=teacher, vocab=student.config.vocab_size)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    return loss.detach(), metrics, torch.cat([g.flatten() for g in grads])


def _reference_loss(models, cfg, batch, *, behaviour="mix_logp", weighted=None, temperature=None):
    """The stage's loss written out (float64): sum over valid tokens of
    -min(rho*A, clip(rho)*A), rho = q_theta(y_t)/p~(y_t), plus the single-step term
    w_t * KL(softmax(s/T) || softmax(t/T)); ``behaviour``/``weighted``/``temperature`` swap in the
    WRONG wiring for the power checks. Returns (loss, grads)."""
    _, student, teacher = models
    T = cfg.temperature if temperature is None else temperature
    weighted = cfg.single_step_importance_weight if weighted is None else weighted
    args = (batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"])
    V = student.config.vocab_size
    s = fwd.response_logits(student, *args, V).to(F64)  # (B, T, V)
    with torch.no_grad():
        t = fwd.response_logits(teacher, *args, V).to(F64)
    mask = batch["response_mask"].bool()
    ls, lt = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    logq = ls.gather(-1, batch["response_ids"][..., None])[..., 0]  # (B, T)
    rho = torch.exp(logq - batch[behaviour].to(F64))
    A = batch["advantages"].to(F64)
    eps = cfg.clip_eps
    pg = -torch.minimum(rho * A, rho.clamp(1 - eps, 1 + eps) * A) if eps else -rho * A
    loss = cfg.pg_coef * torch.where(mask, pg, 0.0).sum()
    if cfg.single_step:
        kl = (ls.exp() * (ls - lt)).sum(-1)  # (B, T)
        if weighted:
            kl = kl * batch["single_step_weights"].to(F64)
        loss = loss + torch.where(mask, kl, 0.0).sum()
    grads = torch.autograd.grad(loss, list(student.parameters()))
    return loss.detach(), torch.cat([g.flatten() for g in grads])


def _close(a, b, rtol=1e-4, atol=1e-6) -> bool:
    return bool(torch.allclose(a.to(F64), b.to(F64), rtol=rtol, atol=atol))


def _differs(a, b, margin=1e-3) -> bool:
    """Relative difference of two scalars or vectors above ``margin``."""
    a, b = a.to(F64).flatten(), b.to(F64).flatten()
    return float((a - b).norm() / b.norm().clamp(min=1e-12)) > margin


# ---------------------------------------------------------------------------------------------
# the loss of one minibatch
# ---------------------------------------------------------------------------------------------


def test_first_epoch_rho_is_q_over_mixture(models):
    """Sampled from p~ with the same student that computes the loss (first PPO epoch), the ratio
    is rho = q_theta/p~ = the per-step weight w_t, not q_theta/q_old = 1: with A = 1, no clipping and
    no single-step term the loss is exactly -sum_t w_t A_t (here A_t = w_t - 1, so that rho = 1
    would be off by sum_t (w_t - 1)^2)."""
    cfg = cfg_of(preset="paper", clip_eps=0.0, single_step=False)
    batch = _batch(cfg, _rollouts(models))
    w = adv.step_importance_weights(batch["student_logp"], batch["mix_logp"], batch["response_mask"])
    A = torch.where(batch["response_mask"].bool(), w - 1.0, 0.0)
    batch["advantages"] = A
    loss, metrics, _ = _stage_loss(models, cfg, batch)
    torch.testing.assert_close(loss.to(F64), -(w * A).sum().to(F64), rtol=1e-4, atol=1e-5)
    assert float((A * A).sum()) > 0.05, "the rollouts must have weights away from 1 for this test to bite"
    assert abs(metrics["ratio_new_old"] - 1.0) < 1e-4  # the student did not move: q_theta == q_old


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("weighted", [True, False])
def test_loss_and_gradient_match_the_formula(models, temperature, weighted):
    """minillm_loss (fused path: one chunked pass for log q and the KL) equals the formula written
    out -- rho against p~, the single-step weight when configured, logits divided by the temperature
    on both sides -- in value and in gradient; each wrong wiring gives a different number."""
    cfg = cfg_of(preset="paper", temperature=temperature, single_step_importance_weight=weighted)
    batch = _batch(cfg, _rollouts(models, temperature=temperature))
    loss, _, grads = _stage_loss(models, cfg, batch)
    ref, ref_grads = _reference_loss(models, cfg, batch)
    assert _close(loss, ref), (float(loss), float(ref))
    assert _close(grads, ref_grads, rtol=1e-3, atol=1e-6), float((grads - ref_grads).abs().max())
    # power: the wrong wirings move the loss or the gradient by far more than the tolerance
    wrong = {
        "rho vs q_old": _reference_loss(models, cfg, batch, behaviour="student_logp"),
        "weight flipped": _reference_loss(models, cfg, batch, weighted=not weighted),
    }
    if temperature != 1.0:
        wrong["temperature 1"] = _reference_loss(models, cfg, batch, temperature=1.0)
    for name, (l_bad, g_bad) in wrong.items():
        assert _differs(l_bad, ref) or _differs(g_bad, ref_grads, 1e-2), name


@pytest.mark.parametrize("importance", ["step", "exact"])
def test_single_step_term_carries_its_importance_weight(models, importance):
    """With single_step_importance_weight on, the single-step term (pg_coef 0) is
    sum_t w_t KL_t with w_t the per-step q/p~ (step) or the prefix product (exact); the logged
    single_step_kl is that sum per token."""
    cfg = cfg_of(preset="paper", pg_coef=0.0, single_step_importance_weight=True, importance=importance)
    ro = _rollouts(models)
    batch = _batch(cfg, ro)
    _, student, teacher = models
    args = (ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
    with torch.no_grad():
        s = fwd.response_logits(student, *args, student.config.vocab_size)
        t = fwd.response_logits(teacher, *args, student.config.vocab_size)
    kl, _ = adv.reverse_kl_and_logp(s, t, ro.response_mask, None)  # (B, T), 0 at padding
    w = adv.single_step_weights(ro.student_logp, ro.mix_logp, ro.response_mask, importance)
    # row by row (the weights average to about 1 over a batch, not within a row)
    losses, logged = [], []
    for i in range(ro.batch_size):
        row = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        row["num_tokens"] = int(row["response_mask"].sum())
        loss, metrics, _ = _stage_loss(models, cfg, row)
        losses.append(loss)
        logged.append(metrics["single_step_kl"] * row["num_tokens"])
    losses, logged = torch.stack(losses), torch.tensor(logged)
    expected, unweighted = (w * kl).sum(-1), kl.sum(-1)  # (B,)
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logged, expected, rtol=1e-4, atol=1e-5)
    assert _differs(unweighted, expected, 2e-2), (unweighted, expected)


# ---------------------------------------------------------------------------------------------
# advantages_for
# ---------------------------------------------------------------------------------------------


def test_whitened_advantages_have_zero_mean_unit_variance(models):
    """With whiten on (the minidistill default), one process: the advantages over valid tokens have
    mean 0 and population variance 1; the returns they come from do not."""
    cfg = cfg_of()
    assert cfg.whiten is True and cfg.importance == "step"
    ro = _rollouts(models)
    out = rollouts.advantages_for(cfg, ro)
    valid = ro.response_mask.bool()
    A, R = out["advantages"][valid].to(F64), out["returns"][valid].to(F64)
    assert valid.sum() > 4
    assert abs(float(A.mean())) < 1e-5 and abs(float(A.var(unbiased=False)) - 1.0) < 1e-4
    assert abs(float(R.mean())) > 1e-2 or abs(float(R.var(unbiased=False)) - 1.0) > 1e-2
    assert (out["advantages"][~valid] == 0).all()


def test_rewards_are_teacher_minus_student(models):
    """r_t = reward_scale * (log p(y_t) - log q(y_t)): the teacher's log-prob minus the student's,
    and the next-token returns are sums of those (gamma 1, no length normalisation)."""
    ro = _rollouts(models)
    valid = ro.response_mask.bool()
    for preset, scale in (("paper", 1.0), ("official", 2.0)):
        cfg = cfg_of(preset=preset, length_norm=False, whiten=False, gamma=1.0, include_current=False)
        out = rollouts.advantages_for(cfg, ro)
        expected = scale * (ro.teacher_logp - ro.student_logp)
        torch.testing.assert_close(out["rewards"][valid], expected[valid].to(out["rewards"].dtype))
        # R_t = sum_{t' > t} r_t'  (suffix sums of the rewards, without the current token)
        r = torch.where(valid, expected, 0.0)
        suffix = r.flip(-1).cumsum(-1).flip(-1) - r
        torch.testing.assert_close(out["returns"][valid], suffix[valid].to(out["returns"].dtype), rtol=1e-5, atol=1e-5)
    assert float((ro.teacher_logp - ro.student_logp)[valid].abs().mean()) > 0.1  # a sign flip is visible

"""The MiniLLM policy as the loss sees it: no dropout (base and LoRA), behaviour log-probs that
match the loss's own forward, so that rho = 1 at the first PPO epoch with pure student sampling."""

from __future__ import annotations

import pytest
import torch
from tiny_tokenizer import make_tokenizer, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from minidistill import models
from minidistill.config import build
from minidistill.data import collate_prompts
from minidistill.generation.sampler import sample
from minidistill.parts import objectives, rollouts
from minidistill.stages import minillm


def cfg_of(**kw) -> minillm.Config:
    base = {"type": "minillm", "name": "minillm", "lm_coef": 0.0, "mix_alpha": 0.0, "ppo_epochs": 1}
    base.update(kw)
    return build(minillm.Config, base, "test:")


def tiny_gpt2(tok, dropout: float = 0.3, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=512,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
    )
    return GPT2LMHeadModel(cfg)


def lora_llama(tok, dropout: float = 0.5):
    from minidistill.config import LoraConfig

    model = tiny_llama(tok, seed=3)
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj", "up_proj"])
    model = models.add_lora(model, lora)
    with torch.no_grad():  # LoRA's B starts at 0, which would hide its dropout: make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def first_epoch_batch(student, teacher, tok, cfg):
    prompts = [tok("Say hi").input_ids, tok("A longer prompt").input_ids, tok("Q").input_ids, tok("Why").input_ids]
    ids, mask = collate_prompts(prompts, tok.pad_token_id)
    ro = sample(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=8,
        mix_alpha=cfg.mix_alpha,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    batch = {f: getattr(ro, f) for f in ro.__dataclass_fields__ if getattr(ro, f) is not None}
    batch.update(rollouts.advantages_for(cfg, ro))
    batch["num_tokens"] = int(batch["response_mask"].sum())
    batch["stats"] = {}
    return batch


@pytest.mark.parametrize("make_student", [tiny_gpt2, lora_llama], ids=["gpt2-dropout", "lora-dropout"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_dropout_in_policy_loss_rho_is_one(make_student, checkpointing):
    tok = make_tokenizer()
    student = make_student(tok)
    teacher = tiny_llama(tok, seed=2).eval()
    if checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = cfg_of(clip_eps=0.2, single_step=True)
    models.train_mode(student, dropout=False)  # as the loop holds the MiniLLM student, through backward
    batch = first_epoch_batch(student, teacher, tok, cfg)  # sampling keeps that state
    loss, metrics = objectives.minillm_loss(student, batch, cfg=cfg, teacher=teacher, vocab=len(tok))
    # rho = q_theta / p~ = q_theta / q_old at a = 0: exactly 1 up to float rounding, nothing clipped
    assert abs(metrics["ratio_new_old"] - 1.0) < 1e-5, metrics
    assert metrics["clip_frac"] == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    # still without dropout after sampling, loss and backward
    assert not any(m.training for m in student.modules() if isinstance(m, torch.nn.Dropout))


def test_dropout_would_break_rho():
    """The check above can fail: the same GPT-2 forward in train mode moves log q by dropout noise."""
    tok = make_tokenizer()
    student, teacher = tiny_gpt2(tok), tiny_llama(tok, seed=2).eval()
    cfg = cfg_of()
    batch = first_epoch_batch(student, teacher, tok, cfg)
    student.train()
    logits = objectives.response_logits(student, batch, len(tok))
    logq = torch.log_softmax(logits.float(), -1).gather(-1, batch["response_ids"][..., None])[..., 0]
    m = batch["response_mask"].bool()
    assert (logq - batch["student_logp"])[m].abs().max() > 1e-2


def test_train_mode_without_dropout_keeps_checkpointing_layers_training():
    tok = make_tokenizer()
    student = tiny_gpt2(tok)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    models.train_mode(student, dropout=False)
    assert all(b.training for b in student.transformer.h)  # transformers checkpoints a layer only in training mode
    assert not any(m.training for m in student.modules() if isinstance(m, torch.nn.Dropout))
    models.train_mode(student)
    assert all(m.training for m in student.modules())


@pytest.mark.parametrize("student_kind", ["gpt2-dropout", "lora-dropout"])
def test_stage_trains_without_dropout(recipe_file, tmp_path, student_kind):
    """Through the pipeline and the loop: every step starts a fresh buffer (one minibatch, one PPO
    epoch, a = 0), so rho must be 1 at every step and nothing may be clipped."""
    from minidistill.reporting.tracking import read_metrics
    from minidistill.run import main

    tok = make_tokenizer()
    top = {}
    if student_kind == "gpt2-dropout":
        gpt2 = tmp_path / "gpt2"
        tiny_gpt2(tok).save_pretrained(gpt2)
        tok.save_pretrained(gpt2)
        top = {"teacher": {"model": str(gpt2)}, "student": {"init": "prune", "keep_layers": [0, 1]}}
    else:
        top = {
            "student": {
                "init": "prune",
                "keep_layers": [0, 3],
                "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.5, "target_modules": ["q_proj", "v_proj"]},
            }
        }
    stages = [
        {
            "type": "minillm",
            "name": "minillm",
            "max_steps": 3,
            "lr": 1e-2,
            "warmup_steps": 0,
            "num_rollouts": 4,
            "rollout_batch_size": 4,
            "batch_size": 4,
            "ppo_epochs": 1,
            "max_new_tokens": 6,
            "mix_alpha": 0.0,
            "lm_coef": 0.0,
            "eval_examples": 2,
            "eval_max_new_tokens": 4,
        }
    ]
    path = recipe_file(stages, **top)
    assert main([str(path)]) == 0
    rows = [r for r in read_metrics(path.parent / "run" / "metrics.jsonl") if "pg_loss" in r]
    assert len(rows) == 3
    for r in rows:  # steps 2 and 3 run with a LoRA adapter that is no longer zero
        assert abs(r["ratio_new_old"] - 1.0) < 1e-5, r
        assert r["clip_frac"] == 0.0, r


def test_rescored_behaviour_logp_makes_rho_exact_in_bf16():
    """Under bf16 autocast KV-cached decoding and the loss's full forward round differently;
    rescoring the rollout with the loss's forward (recompute_logp) makes rho exactly 1 at a = 0."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision="bf16", cpu=True)
    tok = make_tokenizer()
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2).to(torch.bfloat16).eval()
    models.train_mode(student, dropout=False)
    ratios = {}
    for recompute in ("never", "always"):
        cfg = cfg_of(recompute_logp=recompute)
        prompts = [tok("Say hi").input_ids, tok("A longer prompt").input_ids, tok("Q").input_ids]
        ids, mask = collate_prompts(prompts, tok.pad_token_id)
        with acc.autocast():
            ro = sample(
                student,
                teacher,
                ids,
                mask,
                max_new_tokens=12,
                mix_alpha=0.0,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                generator=torch.Generator().manual_seed(0),
                vocab=len(tok),
            )
        if rollouts.recompute_logp(cfg, "bf16"):
            with acc.autocast():  # the loop draws batches (and so rescores) under the run's autocast
                ro = rollouts.rescore_behaviour(student, ro, cfg, len(tok))
        batch = {f: getattr(ro, f) for f in ro.__dataclass_fields__ if getattr(ro, f) is not None}
        batch.update(rollouts.advantages_for(cfg, ro))
        batch["num_tokens"], batch["stats"] = int(batch["response_mask"].sum()), {}
        with acc.autocast():
            _, metrics = objectives.minillm_loss(student, batch, cfg=cfg, teacher=teacher, vocab=len(tok))
        ratios[recompute] = metrics["ratio_new_old"]
    assert abs(ratios["always"] - 1.0) < 1e-7, ratios
    assert abs(ratios["never"] - 1.0) > 1e-6, (
        ratios
    )  # the check has something to catch (a mean: deviations partly cancel)
    assert rollouts.recompute_logp(cfg_of(), "bf16") and not rollouts.recompute_logp(cfg_of(), "fp32")
    AcceleratorState._reset_state()


def test_rescored_behaviour_of_a_split_buffer():
    """student_rows: rescoring rebuilds log p~ per row, log q on the rows drawn at a = 0 (their
    behaviour policy is the student alone) and log(a p + (1-a) q) on the mixed rows."""
    from minidistill.functional import advantages as adv

    tok = make_tokenizer()
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    cfg = cfg_of(recompute_logp="always", student_rows=0.5, mix_alpha=0.2)
    prompts = [tok("Say hi").input_ids, tok("A longer prompt").input_ids, tok("Q").input_ids]
    ids, mask = collate_prompts(prompts, tok.pad_token_id)
    ro = sample(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=6,
        mix_alpha=0.2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
        vocab=len(tok),
    )
    ro.mixed = torch.tensor([False, True, False])
    ro = rollouts.rescore_behaviour(student, ro, cfg, len(tok))
    m = ro.response_mask.bool()
    own = m & ~ro.mixed[:, None]
    assert torch.equal(ro.mix_logp[own], ro.student_logp[own])
    expected = adv.mixed_logp(ro.teacher_logp, ro.student_logp, 0.2)
    torch.testing.assert_close(ro.mix_logp[1][m[1]], expected[1][m[1]])
    assert not ro.mix_logp[~m].any()

"""The MiniLLM stage on tiny models: padding invariance of the update, a run that lowers the
student's reverse KL to the teacher, L_PT, and the presets."""

from __future__ import annotations

import pytest
import torch
from tiny_tokenizer import make_tokenizer, tiny_llama
from transformers import AutoModelForCausalLM

from minidistill.config import build
from minidistill.data import collate_prompts
from minidistill.functional import advantages as adv
from minidistill.generation import sampler
from minidistill.generation.sampler import sample
from minidistill.parts import objectives, rollouts
from minidistill.reporting.tracking import read_metrics
from minidistill.run import main
from minidistill.stages import minillm


def cfg_of(**kw) -> minillm.Config:
    base = {"type": "minillm", "name": "minillm", "lm_coef": 0.0}
    base.update(kw)
    return build(minillm.Config, base, "test:")


def test_presets_fill_unset_fields_and_explicit_wins():
    c = cfg_of(preset="official", gamma=0.5)
    assert c.include_current is True and c.whiten is True and c.reward_scale == 2.0 and c.gamma == 0.5
    d = cfg_of()
    assert d.preset == "minidistill" and d.include_current is False and d.gamma == 1.0 and d.whiten is True
    with pytest.raises(Exception, match="mix_alpha"):
        cfg_of(mix_alpha=1.5)


def _rollout_batch(seed=0, pad_extra=0):
    torch.manual_seed(seed)
    tok = make_tokenizer()
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    prompts = [tok("Say hi").input_ids, tok("A longer prompt here").input_ids, tok("Q").input_ids]
    ids, mask = collate_prompts(prompts, tok.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    ro = sample(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=6,
        mix_alpha=0.2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=g,
    )
    batch = {f: getattr(ro, f) for f in ro.__dataclass_fields__}
    if pad_extra:
        assert batch["teacher_hidden"] is not None  # the tiny Llama splits into backbone + head
        for k in sampler.RESPONSE_FIELDS:
            fill = tok.pad_token_id if k == "response_ids" else 0
            x = batch[k]
            if x is None:  # the served teacher's top-k: not kept by a local teacher
                continue
            batch[k] = torch.cat([x, torch.full((x.shape[0], pad_extra, *x.shape[2:]), fill, dtype=x.dtype)], 1)
    return student, teacher, batch


@pytest.mark.parametrize("preset", ["minidistill", "paper", "official"])
def test_update_is_invariant_to_right_padding(preset):
    cfg = cfg_of(preset=preset)
    results = []
    for extra in (0, 5):
        student, teacher, batch = _rollout_batch(pad_extra=extra)
        ro = sampler.Rollout(**{k: batch[k] for k in sampler.Rollout.__dataclass_fields__})
        batch.update(rollouts.advantages_for(cfg, ro))
        batch["num_tokens"] = int(batch["response_mask"].sum())
        batch["stats"] = {}
        loss, metrics = objectives.minillm_loss(
            student, batch, cfg=cfg, teacher=teacher, vocab=student.config.vocab_size
        )
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters()])
        results.append((loss.detach(), grads, batch["advantages"][batch["response_mask"].bool()]))
    (l0, g0, a0), (l1, g1, a1) = results
    assert torch.allclose(a0, a1, atol=1e-6)
    assert torch.allclose(l0, l1, atol=1e-5, rtol=1e-5)
    assert torch.allclose(g0, g1, atol=1e-6, rtol=1e-4)


def _mean_reverse_kl(student, teacher, tok, prompts, seed=0) -> float:
    """Per-token exact reverse KL along the student's own samples (a = 0)."""
    ids, mask = collate_prompts(prompts, tok.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for _ in range(4):
        ro = sample(
            student,
            teacher,
            ids,
            mask,
            max_new_tokens=16,
            mix_alpha=0.0,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            generator=g,
        )
        batch = {f: getattr(ro, f) for f in ro.__dataclass_fields__}
        with torch.no_grad():
            s = objectives.response_logits(student, batch, student.config.vocab_size)
            t = objectives.response_logits(teacher, batch, student.config.vocab_size)
            kl, cnt = adv.single_step_kl(s, t, ro.response_mask)
        total, n = total + float(kl), n + int(cnt)
    return total / n


def test_tiny_minillm_run_lowers_reverse_kl(recipe_file, sharp_dir):
    from minidistill import data as mdata

    # L_PT here is pure KD on the corpus text (kd_ratio 1), so every term pulls toward the teacher
    stages = [
        {
            "type": "minillm",
            "name": "minillm",
            "max_steps": 20,
            "lr": 1e-2,
            "warmup_steps": 0,
            "num_rollouts": 8,
            "rollout_batch_size": 8,
            "batch_size": 8,
            "ppo_epochs": 2,
            "max_new_tokens": 12,
            "lm_coef": 0.1,
            "kd_ratio": 1.0,
            "lm_batch_size": 2,
            "eval_every": 10,
            "eval_examples": 4,
            "eval_max_new_tokens": 8,
        }
    ]
    # a fresh random 2-layer student: near-uniform, far from the peaked teacher
    path = recipe_file(
        stages,
        teacher={"model": str(sharp_dir)},
        student={"init": "config", "config_overrides": {"num_hidden_layers": 2}},
    )
    out = path.parent / "run"
    tok = make_tokenizer()
    teacher = AutoModelForCausalLM.from_pretrained(sharp_dir).eval()
    # the student as the pipeline builds it (same config, same seed)
    from minidistill.models import fresh_from_config

    before = fresh_from_config(teacher, {"num_hidden_layers": 2}, seed=0).eval()
    examples = mdata.load_instructions(path.parent / "train.jsonl")
    prompts, _, _ = mdata.tokenize_prompts(examples[:8], tok, template="alpaca", max_prompt_length=224)
    kl_before = _mean_reverse_kl(before, teacher, tok, prompts)
    assert main([str(path)]) == 0
    after = AutoModelForCausalLM.from_pretrained(out / "minillm" / "final").eval()
    kl_after = _mean_reverse_kl(after, teacher, tok, prompts)
    assert kl_after < 0.85 * kl_before, (kl_before, kl_after)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "minillm"]
    train_rows = [r for r in rows if "pg_loss" in r]
    assert len(train_rows) == 20
    for key in (
        "single_step_kl",
        "lm_loss",
        "clip_frac",
        "reward",
        "mix_log_ratio",
        "response_length",
        "eos_rate",
        "cut_rate",
        "repeat_rate",
    ):
        assert key in train_rows[0]
    assert "rkl_estimate" not in train_rows[0]  # a = 0.2: the mean log ratio is over mixture samples
    assert any("valid/rougeL" in r for r in rows)
    assert (out / "minillm" / "best" / "config.json").is_file()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_minillm_runs_with_lora_and_gradient_checkpointing(recipe_file, precision):
    stages = [
        {
            "type": "minillm",
            "name": "minillm",
            "max_steps": 2,
            "lr": 1e-3,
            "warmup_steps": 0,
            "num_rollouts": 4,
            "rollout_batch_size": 4,
            "batch_size": 2,
            "ppo_epochs": 1,
            "max_new_tokens": 6,
            "lm_coef": 0.5,
            "lm_batch_size": 2,
            "eval_examples": 2,
            "eval_max_new_tokens": 4,
            "save_every": 1,
        }
    ]
    student = {
        "init": "prune",
        "keep_layers": [0, 3],
        "gradient_checkpointing": True,
        "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    }
    path = recipe_file(stages, student=student, precision=precision)
    assert main([str(path)]) == 0
    final = path.parent / "run" / "minillm" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in k for k in merged.state_dict())
    rows = [r for r in read_metrics(path.parent / "run" / "metrics.jsonl") if "pg_loss" in r]
    assert len(rows) == 2 and all(r["skipped_steps"] == 0 for r in rows)


@pytest.mark.parametrize("student_rows", [0.0, 0.4])
def test_iteration_order_and_resume_at_every_micro_batch(student_rows):
    """The source walks collect -> ppo_epochs x minibatches (never straddling epochs) -> collect;
    a source loaded from state_dict after any micro-batch (also in the pre-(epoch, position)
    checkpoint format) yields exactly the same following micro-batches. With student_rows the
    buffer's row flags (``mixed``) travel with it."""
    from tiny_assets import fake_run

    tok = make_tokenizer()
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    run = fake_run(teacher, tok)
    prompts = [tok(p).input_ids for p in ["Say hi", "A longer prompt here", "Q", "Name a fruit", "2 and 3"]]
    cfg = cfg_of(
        num_rollouts=5,
        rollout_batch_size=3,
        batch_size=2,
        ppo_epochs=2,
        max_new_tokens=5,
        lm_coef=0.5,
        student_rows=student_rows,
    )
    corpus = torch.randint(3, len(tok), (6, 9), generator=torch.Generator().manual_seed(0))

    def source():
        return rollouts.RolloutSource(run, cfg, student, prompts, corpus)

    def walk(src, n):
        return [src.next_batch() for _ in range(n)]

    ref = source()
    states, batches = [], []
    for _ in range(8):  # 3 minibatches (2 + 2 + 1 rows) per epoch, 2 epochs: 6 per iteration
        states.append(ref.state_dict())
        batches.append(ref.next_batch())
    assert [b["response_ids"].shape[0] for b in batches] == [2, 2, 1, 2, 2, 1, 2, 2]
    if student_rows:  # 2 of each buffer's 5 rows drawn at a = 0: log p~ = log q and A != 0 only there
        for b in batches:
            own = ~b["mixed"]
            assert torch.equal(b["mix_logp"][own], b["student_logp"][own])
            assert not b["advantages"][b["mixed"]].any()
        assert sum(int((~b["mixed"]).sum()) for b in batches[:3]) == 2
        assert "student_eos_rate" in batches[0]["stats"] and "rkl_estimate" in batches[0]["stats"]
    else:
        assert "mixed" not in batches[0]
    assert ref.iteration == 2 and ref.epoch == 0 and ref.position == 4
    first = torch.cat([b["prompt_ids"][:, -1] for b in batches[:3]])  # each epoch covers every row once
    assert sorted(first.tolist()) == sorted(torch.cat([b["prompt_ids"][:, -1] for b in batches[3:6]]).tolist())
    for b in batches:
        assert b["num_tokens"] == {
            "response": int(b["response_mask"].sum()),
            "lm": b["lm_ids"].numel() - b["lm_ids"].shape[0],
        }
        assert b["response_mask"][:, -1].any()  # response columns trimmed to the longest row

    def same(a, b):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k

    for i in range(1, 8):
        for legacy in (False, True):
            state = dict(states[i])
            if legacy and state["buffer"]:  # the former format: one flat order and a flat position
                state["order"] = state["order"].reshape(-1)
                state["order_pos"] = state.pop("epoch") * state["order"].numel() // cfg.ppo_epochs + state.pop(
                    "position"
                )
            src = source()
            src.load_state_dict(state)
            for a, b in zip(walk(src, 8 - i), batches[i:]):
                same(a, b)


def test_mix_alpha_schedule_decays_to_the_students_own_samples():
    """mix_alpha_end: a goes linearly from mix_alpha (first buffer) to mix_alpha_end (last); each
    buffer's samples, log p~ and statistics use its own a; paper/official keep a constant."""
    from tiny_assets import fake_run

    c = cfg_of(mix_alpha=0.2, mix_alpha_end=0.0)
    assert [round(rollouts.mix_alpha_at(c, i, 5), 6) for i in range(5)] == [0.2, 0.15, 0.1, 0.05, 0.0]
    assert rollouts.mix_alpha_at(c, 0, 1) == 0.2  # one buffer: the start value
    assert cfg_of().mix_alpha_end == 0.0  # the default preset decays
    for preset in ("paper", "official"):
        p = cfg_of(preset=preset)
        assert p.mix_alpha_end is None and rollouts.mix_alpha_at(p, 4, 5) == p.mix_alpha == 0.2
    with pytest.raises(Exception, match="mix_alpha_end"):
        cfg_of(mix_alpha=0.1, mix_alpha_end=0.3)

    tok = make_tokenizer()
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    prompts = [tok(p).input_ids for p in ["Say hi", "A longer prompt here", "Q", "Name a fruit"]]
    cfg = cfg_of(num_rollouts=4, rollout_batch_size=4, batch_size=4, ppo_epochs=1, max_new_tokens=5, mix_alpha=0.2)
    src = rollouts.RolloutSource(fake_run(teacher, tok), cfg, student, prompts, None)
    src.iterations = 3
    seen = []
    for _ in range(3):
        b = src.next_batch()
        seen.append(b["stats"]["mix_alpha"])
        valid = b["response_mask"].bool()
        mixed = adv.mixed_logp(b["teacher_logp"], b["student_logp"], seen[-1])
        torch.testing.assert_close(b["mix_logp"][valid], mixed[valid].to(b["mix_logp"].dtype))
    assert seen == pytest.approx([0.2, 0.1, 0.0])
    assert torch.equal(b["mix_logp"][valid], b["student_logp"][valid])  # the last buffer: the student's own

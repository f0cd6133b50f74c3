"""Students must keep stopping: MiniLLM on a teacher that always stops within a few tokens must not
lower the student's EOS rate at a generation limit well above the training one, and the rollout
buffer knows which responses were cut at the limit (they do not get the stop token's credit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tiny_assets import tiny_recipe
from tiny_tokenizer import make_tokenizer

from minidistill import data, models
from minidistill.config import build
from minidistill.generation.evaluation import generate_ids
from minidistill.generation.sampler import sample
from minidistill.parts import rollouts
from minidistill.run import main
from minidistill.stages import minillm

pytestmark = pytest.mark.e2e  # end to end: `./test.sh -m 'not slow and not e2e'` skips it


def _run(root: Path, tiny_dir, tiny_data, stages, **top) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(root, tiny_dir, tiny_data, stages, **top)))
    assert main([str(path)]) == 0
    return root / "run"


def _eos_rate(folder, prompts, limit: int) -> tuple[float, float]:
    model, tok = models.load_model(str(folder), device="cpu")
    ended, lengths = [], []
    for seed in (1, 2, 3):
        new = generate_ids(model, tok, prompts, max_new_tokens=limit, batch_size=16, seed=seed, progress=False)
        ended += [len(r) < limit for r in new]
        lengths += [len(r) for r in new]
    return sum(ended) / len(ended), sum(lengths) / len(lengths)


@pytest.fixture(scope="module")
def brief_teacher(tmp_path_factory, tiny_dir):
    """A 4-layer teacher fine-tuned on the tiny data's 1-6 character answers: it answers and stops."""
    from tiny_assets import write_tiny_data

    root = tmp_path_factory.mktemp("brief")
    d = write_tiny_data(root)
    out = _run(
        root / "teach",
        tiny_dir,
        d,
        [
            {
                "type": "sft",
                "name": "sft",
                "max_steps": 200,
                "lr": 3e-3,
                "batch_size": 8,
                "warmup_steps": 0,
                "scheduler": "constant",
            }
        ],
        student={"init": "config", "config_overrides": {}},
    )
    tok = make_tokenizer()
    ex = data.load_instructions(d["valid"]) + data.load_instructions(d["train"])[:8]
    prompts, _, _ = data.tokenize_prompts(ex, tok, template="alpaca", max_prompt_length=224)
    return out / "sft" / "final", d, prompts


def test_minillm_does_not_lower_the_eos_rate(brief_teacher, tmp_path):
    teacher, d, prompts = brief_teacher
    rate, length = _eos_rate(teacher, prompts, 64)
    assert rate >= 0.9 and length < 10, (rate, length)  # the premise: the teacher stops within a few tokens
    # a student from the teacher's last layer alone, barely fine-tuned: it rarely stops within 64 tokens
    stages = [
        {
            "type": "sft",
            "name": "sft",
            "max_steps": 2,
            "lr": 3e-3,
            "batch_size": 8,
            "warmup_steps": 0,
            "scheduler": "constant",
        },
        {
            "type": "minillm",
            "name": "minillm",
            "max_steps": 16,
            "lr": 3e-3,
            "warmup_steps": 0,
            "num_rollouts": 8,
            "rollout_batch_size": 8,
            "batch_size": 8,
            "ppo_epochs": 1,
            "max_new_tokens": 12,
            "lm_coef": 0.0,
            "eval_examples": 2,
            "eval_max_new_tokens": 4,
        },
    ]
    out = _run(
        tmp_path, teacher, d, stages, teacher={"model": str(teacher)}, student={"init": "prune", "keep_layers": [3]}
    )
    before, _ = _eos_rate(out / "sft" / "final", prompts, 64)
    after, after_len = _eos_rate(out / "minillm" / "final", prompts, 64)
    print(
        f"EOS rate at 64 new tokens (trained at 12): teacher {rate:.2f}, before MiniLLM {before:.2f}, after {after:.2f}"
    )
    assert after >= before and after >= 0.8, (before, after)
    assert after_len < 20


def test_rollouts_know_which_responses_were_cut(brief_teacher):
    folder, _, prompts = brief_teacher
    teacher, tok = models.load_model(str(folder), device="cpu")
    ids, mask = data.collate_prompts(prompts, tok.pad_token_id)
    # 4 new tokens: answers of 1-3 characters stop, longer ones are cut
    student = models.prune_layers(teacher, [0, 1, 3])  # rewards log p - log q must not be 0
    ro = sample(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=4,
        mix_alpha=0.2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    lengths = ro.response_mask.sum(-1)
    last = ro.response_ids.gather(1, (lengths - 1)[:, None])[:, 0]
    assert torch.equal(ro.ended, last == tok.eos_token_id)
    assert ro.ended.any() and (~ro.ended).any(), ro.ended
    # the stage bootstraps the last return of exactly the cut rows
    on = build(minillm.Config, {"type": "minillm", "lm_coef": 0.0}, "t:")
    off = build(minillm.Config, {"type": "minillm", "lm_coef": 0.0, "bootstrap_truncated": False}, "t:")
    R_on, R_off = rollouts.advantages_for(on, ro)["returns"], rollouts.advantages_for(off, ro)["returns"]
    rows = torch.arange(ro.batch_size)
    changed = R_on[rows, lengths - 1] != R_off[rows, lengths - 1]
    assert torch.equal(changed, ~ro.ended)
    r = rollouts.advantages_for(on, ro)["rewards"]
    torch.testing.assert_close(
        R_on[~ro.ended, :][torch.arange(int((~ro.ended).sum())), lengths[~ro.ended] - 1],
        r[~ro.ended].sum(-1) / lengths[~ro.ended],
    )


@pytest.mark.slow
def test_minillm_keeps_a_stopping_student_stopping(brief_teacher, tmp_path):
    """Issue 24, step 3. A student that already stops as often as the teacher at a long limit
    (the teacher's last layer, briefly fine-tuned) trained by MiniLLM with the default
    teacher-mixed sampling (preset minidistill: a from 0.2 to 0, ``mix_alpha_end``) at a rollout
    limit that cuts about half of the teacher's answers (as the comparison's 96 tokens cut a third
    of them) must still stop as often as the teacher at a long limit: within 0.05. With a constant
    a = 0.2 (the default before, ``mix_alpha_end: 0.2``) this run ends at 0.90 and fails; over 9
    rollout seeds of the same chain (bench/eos_ablation.py, docs/eos) the schedule ends at 0.96 on
    average (6 of 9 within 0.05) against 0.92 (4 of 9), so this seed is one draw of a shifted
    distribution, not a guarantee for every seed. (The test above starts from a student that
    rarely stops and only asks for a rise, at 16 steps.)"""
    teacher, d, prompts = brief_teacher
    rate, _ = _eos_rate(teacher, prompts, 64)
    assert rate >= 0.9  # the premise: the teacher stops within a few tokens
    stages = [
        {
            "type": "sft",
            "name": "sft",
            "max_steps": 6,
            "lr": 3e-3,
            "batch_size": 8,
            "warmup_steps": 0,
            "scheduler": "constant",
        },
        {
            "type": "minillm",
            "name": "minillm",
            "max_steps": 96,
            "lr": 3e-3,
            "warmup_steps": 0,
            "scheduler": "constant",
            "num_rollouts": 16,
            "rollout_batch_size": 16,
            "batch_size": 8,
            "ppo_epochs": 1,
            "max_new_tokens": 6,
            "lm_coef": 0.0,
            "eval_examples": 2,
            "eval_max_new_tokens": 4,
        },
    ]
    out = _run(
        tmp_path, teacher, d, stages, teacher={"model": str(teacher)}, student={"init": "prune", "keep_layers": [3]}
    )
    before, _ = _eos_rate(out / "sft" / "final", prompts, 64)
    assert before >= rate - 0.05, (rate, before)  # the premise: the student starts stopping like the teacher
    after, after_len = _eos_rate(out / "minillm" / "final", prompts, 64)
    print(f"EOS rate at 64 new tokens (rollouts at 6): teacher {rate:.2f}, before {before:.2f}, after {after:.2f}")
    assert after >= rate - 0.05, (rate, before, after, after_len)

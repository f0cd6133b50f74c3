"""End to end on tiny models: SFT through the runner, final/ loadable, resume, LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_assets import crash_after_first_save
from transformers import AutoModelForCausalLM

from minidistill.config import load_recipe
from minidistill.reporting.tracking import read_metrics
from minidistill.run import main, run_recipe

pytestmark = pytest.mark.e2e  # end to end: `./test.sh -m 'not slow and not e2e'` skips it


def sft(**kw):
    stage = {
        "type": "sft",
        "name": "sft",
        "max_steps": 12,
        "lr": 3e-3,
        "batch_size": 4,
        "warmup_steps": 0,
        "scheduler": "constant",
        "eval_every": 6,
    }
    stage.update(kw)
    return [stage]


def test_sft_loss_decreases_and_final_loads(recipe_file):
    path = recipe_file(sft())
    assert main([str(path)]) == 0
    out = path.parent / "run"
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "sft" and "loss" in r]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first * 0.8, (first, last)
    valid = [r["valid/loss"] for r in read_metrics(out / "metrics.jsonl") if "valid/loss" in r]
    assert len(valid) == 2 and valid[-1] < valid[0]
    model = AutoModelForCausalLM.from_pretrained(out / "sft" / "final")
    assert model.config.num_hidden_layers == 2
    assert (out / "sft" / "best" / "config.json").is_file()
    assert (out / "recipe.yaml").read_text().startswith("output_dir:")
    # the same output_dir again without resume/overwrite is refused
    assert main([str(path)]) == 2


def test_keep_best_false_exports_no_best_model(recipe_file):
    path = recipe_file(sft(max_steps=4, eval_every=2, keep_best=False))
    assert main([str(path)]) == 0
    out = path.parent / "run"
    assert [r["valid/loss"] for r in read_metrics(out / "metrics.jsonl") if "valid/loss" in r]  # it did evaluate
    assert (out / "sft" / "final" / "config.json").is_file()
    assert not (out / "sft" / "best").exists()


def _next_step_loss(out: Path) -> float:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "sft" and r["step"] == 4 and "loss" in r][
        -1
    ]["loss"]


def test_resume_gives_same_next_step_loss(recipe_file, tmp_path):
    # uninterrupted: 4 steps
    a = recipe_file(sft(max_steps=4, save_every=2, eval_every=0), name="a.yaml", output_dir=str(tmp_path / "a"))
    assert main([str(a)]) == 0
    # interrupted: run to step 2 (checkpoint), then resume with max_steps 4 from that checkpoint
    b = recipe_file(sft(max_steps=4, save_every=2, eval_every=0), name="b.yaml", output_dir=str(tmp_path / "b"))
    r = load_recipe(b)
    r.stages[0].max_steps = 4
    # simulate a crash right after the step-2 checkpoint by stopping the loop there
    crash_after_first_save(lambda: run_recipe(r))
    assert main([str(b), "resume=auto"]) == 0
    la, lb = _next_step_loss(tmp_path / "a"), _next_step_loss(tmp_path / "b")
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-7)
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "sft" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "sft" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_saves_adapter_and_merged(recipe_file):
    path = recipe_file(
        sft(max_steps=3, eval_every=0),
        student={
            "init": "prune",
            "keep_layers": [0, 3],
            "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        },
    )
    assert main([str(path)]) == 0
    final = path.parent / "run" / "sft" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in k for k in merged.state_dict())
    cfg = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4

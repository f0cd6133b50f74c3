"""The one training loop: the update is the per-token mean over the whole step however the step is
split into micro-batches (batch 8 x accum 1 == batch 1 x accum 8), and a run resumed from a
checkpoint ends exactly where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
from tiny_assets import crash_after_first_save
from transformers import AutoModelForCausalLM

from minidistill.reporting.tracking import read_metrics
from minidistill.run import main

pytestmark = pytest.mark.e2e  # end to end: `./test.sh -m 'not slow and not e2e'` skips it

COMMON = {"lr": 3e-3, "warmup_steps": 0, "scheduler": "constant", "max_steps": 3, "eval_batches": 1}
STAGES = {
    "sft": {"type": "sft", "name": "sft", **COMMON},
    "pd": {"type": "pd", "name": "pd", "alpha": 0.5, "top_k": 8, "eval_at_start": False, **COMMON},
}


def _weights(folder) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _losses(out, stage: str) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["stage"] == stage and "loss" in r and "lr" in r]


@pytest.mark.parametrize("kind", ["sft", "pd"])
def test_gradient_accumulation_invariance(recipe_file, kind):
    outs = []
    for name, batch, accum in (("a.yaml", 8, 1), ("b.yaml", 1, 8)):
        stage = {**STAGES[kind], "batch_size": batch, "grad_accum": accum}
        path = recipe_file([stage], name=name)
        out = path.parent / f"run_{batch}x{accum}"
        assert main([str(path), f"output_dir={out}"]) == 0
        outs.append(out)
    (a, b) = outs
    la, lb = _losses(a, kind), _losses(b, kind)
    assert len(la) == 3 and la == pytest.approx(lb, rel=1e-5)
    assert la[-1] < la[0]  # the steps did something, so the equality below means something
    wa, wb = _weights(a / kind / "final"), _weights(b / kind / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sft", "pd"])
def test_resume_equals_uninterrupted(recipe_file, kind):
    stage = {**STAGES[kind], "max_steps": 4, "save_every": 2, "batch_size": 4}
    path = recipe_file([stage])
    straight = path.parent / "straight"
    assert main([str(path), f"output_dir={straight}"]) == 0
    broken = path.parent / "broken"
    crash_after_first_save(lambda: main([str(path), f"output_dir={broken}"]))
    assert not (broken / kind / "final").exists()
    assert main([str(path), f"output_dir={broken}", "resume=auto"]) == 0
    ws, wb = _weights(straight / kind / "final"), _weights(broken / kind / "final")
    for k in ws:
        assert torch.equal(ws[k], wb[k]), k
    assert _losses(straight, kind)[2:] == _losses(broken, kind)[-2:]

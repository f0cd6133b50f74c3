"""MiniLLM throughput: the teacher-mixed sampler (a = 0.2) over rollout batch sizes, plain HF
``generate`` of each model for reference, and one full MiniLLM iteration (sampling, advantages,
PPO epochs with the single-step term and L_PT) with its time by phase, all as fractions of the
bf16 matmul peak measured in the same run. Writes bench/results/minillm_bench.json.

    PYTHONPATH=. .venv/bin/python bench/minillm_bench.py          # SmolLM2-135M teacher, 10-layer student
    PYTHONPATH=. .venv/bin/python bench/minillm_bench.py --tiny   # random small models, seconds

Model FLOPs per generated token of the sampler: 2 x (student + teacher parameters) (every decode
step runs both models); prompt prefill is counted separately ("incl. prefill"). Responses never
stop early (EOS disabled), so every row generates ``--new`` tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import matmul_peak, prompt_texts, smollm2, write

from minidistill import models
from minidistill.config import build
from minidistill.data import collate_prompts
from minidistill.generation.sampler import sample
from minidistill.parts import objectives, rollouts
from minidistill.stages import minillm


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128], help="sampler rollout batch sizes")
    ap.add_argument("--new", type=int, default=64, help="new tokens per response")
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--iteration-rollouts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, student, tok = smollm2(stride=3, tiny=args.tiny)
    teacher = teacher.to(torch.bfloat16)
    ns, nt = models.n_params(student), models.n_params(teacher)
    auto = torch.autocast("cpu", dtype=torch.bfloat16)
    texts = prompt_texts(tok, max(args.batches + [args.iteration_rollouts]), max_tokens=1000 if args.tiny else 128)
    ids_all = [tok(t).input_ids for t in texts]
    peak = matmul_peak(torch.bfloat16)
    print(
        f"bf16 matmul peak {peak:.0f} GFLOP/s, {torch.get_num_threads()} threads; student {ns / 1e6:.1f}M, teacher {nt / 1e6:.1f}M"
    )
    rows = []

    def add(what, seconds, gen_tokens, flops, **extra):
        row = {
            "what": what,
            "seconds": seconds,
            "tokens": gen_tokens,
            "tokens_per_s": gen_tokens / seconds,
            "gflops": flops / seconds / 1e9,
            "peak_fraction": flops / seconds / 1e9 / peak,
            **extra,
        }
        rows.append(row)
        print(f"{what:52s} {seconds:7.2f}s {row['tokens_per_s']:8.1f} tok/s {100 * row['peak_fraction']:5.1f}% of peak")
        return row

    for b in args.batches:
        ids, mask = collate_prompts([ids_all[i % len(ids_all)] for i in range(b)], tok.pad_token_id)
        prompt_tokens = int(mask.sum())

        def draw(a=args.alpha, ids=ids, mask=mask):
            with auto:
                return sample(
                    student,
                    teacher,
                    ids,
                    mask,
                    max_new_tokens=args.new,
                    mix_alpha=a,
                    eos_token_id=-1,
                    pad_token_id=tok.pad_token_id,
                    generator=torch.Generator().manual_seed(0),
                )

        t, ro = timed(draw, args.repeats)
        n = int(ro.response_mask.sum())
        add(
            f"sampler a={args.alpha}, batch {b}",
            t,
            n,
            2 * (ns + nt) * n,
            batch=b,
            peak_fraction_incl_prefill=2 * (ns + nt) * (n + prompt_tokens) / t / 1e9 / peak,
        )

    b = args.batches[0]
    ids, mask = collate_prompts([ids_all[i % len(ids_all)] for i in range(b)], tok.pad_token_id)
    for name, model, n_par in (("student", student, ns), ("teacher", teacher, nt)):

        def gen(model=model):
            with auto, torch.no_grad():
                return model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=tok.pad_token_id,
                )

        t, out = timed(gen, args.repeats)
        n = (out.shape[1] - ids.shape[1]) * out.shape[0]
        add(f"HF generate, {name} alone, batch {b}", t, n, 2 * n_par * n, batch=b)

    # one full iteration: rollouts + advantages + ppo_epochs over them (minibatch 8) + single-step + L_PT
    R = args.iteration_rollouts
    cfg = build(
        minillm.Config,
        {
            "type": "minillm",
            "lm_coef": 1.0,
            "batch_size": 8,
            "ppo_epochs": 2,
            "num_rollouts": R,
            "rollout_batch_size": R,
            "max_new_tokens": args.new,
            "lm_batch_size": 4,
        },
        "bench:",
    )
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    corpus = torch.randint(0, len(tok), (cfg.lm_batch_size, 128))
    ids, mask = collate_prompts([ids_all[i % len(ids_all)] for i in range(R)], tok.pad_token_id)
    phase = {
        "sample": 0.0,
        "advantages": 0.0,
        "policy_loss_and_backward": 0.0,
        "lpt_and_backward": 0.0,
        "optimizer": 0.0,
    }
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    with auto:
        ro = sample(
            student,
            teacher,
            ids,
            mask,
            max_new_tokens=args.new,
            mix_alpha=cfg.mix_alpha,
            eos_token_id=-1,
            pad_token_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(0),
        )
    phase["sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    buf = {f: getattr(ro, f) for f in ro.__dataclass_fields__ if getattr(ro, f) is not None}
    buf.update(rollouts.advantages_for(cfg, ro))
    phase["advantages"] = time.perf_counter() - t0
    trained = 0
    for _ in range(cfg.ppo_epochs):
        for i in range(0, R, cfg.batch_size):
            mb = {k: v[i : i + cfg.batch_size] for k, v in buf.items()}
            mb["num_tokens"], mb["stats"] = int(mb["response_mask"].sum()), {}
            trained += int(mb["prompt_mask"].sum()) + mb["num_tokens"]
            t0 = time.perf_counter()
            with auto:
                loss, _ = objectives.minillm_loss(student, mb, cfg=cfg, teacher=teacher, vocab=len(tok))
            (loss / mb["num_tokens"]).backward()
            phase["policy_loss_and_backward"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            with auto:
                lm = objectives.pretrain_loss(student, teacher, corpus, cfg.kd_ratio, len(tok))
            (cfg.lm_coef * lm).backward()
            phase["lpt_and_backward"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            phase["optimizer"] += time.perf_counter() - t0
    total = time.perf_counter() - t_start
    n = int(ro.response_mask.sum())
    n_mb = cfg.ppo_epochs * -(-R // cfg.batch_size)
    prompt_tokens = int(mask.sum())
    flops = (
        2 * (ns + nt) * (n + prompt_tokens)  # sampling (both models step, prefill included)
        + 6 * ns * trained  # policy forward + backward over prompt + response per minibatch
        + n_mb * corpus.numel() * (6 * ns + 2 * nt)
    )  # L_PT: student fwd+bwd, teacher forward (kd_ratio > 0)
    add(
        f"full iteration ({R} rollouts, {cfg.ppo_epochs} PPO epochs, L_PT)",
        total,
        n,
        flops,
        phases_s=phase,
        phases_fraction={k: v / total for k, v in phase.items()},
    )
    print("iteration phases: " + ", ".join(f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in phase.items()))
    best = max((r for r in rows if r["what"].startswith("sampler")), key=lambda r: r["peak_fraction"])
    write(
        "minillm_bench_tiny" if args.tiny else "minillm_bench",
        {
            "settings": vars(args),
            "peak_gflops": peak,
            "student_params_m": ns / 1e6,
            "teacher_params_m": nt / 1e6,
            "rows": rows,
            "sampler_best_peak_fraction": best["peak_fraction"],
            "sampler_best_batch": best["batch"],
            "target": "sampler a=0.2 >= 40% of the bf16 matmul peak",
        },
    )


if __name__ == "__main__":
    main()

"""MiniLLM's per-token reward on a student's own rollouts, split by how they end (issue 24).

The long-term term of MiniLLM compares length-normalised returns (mean future reward per token,
r_t = log p(y_t) - log q(y_t)) across the tokens of a buffer. On the tiny chain, rollouts cut at
the limit had a mean reward near 0 per token against -1 to -3 for the finished ones, so their
tokens got positive advantages (docs/eos, "Why the split rambles"). This measures the same split
for real students: each samples the first --n training prompts as a MiniLLM rollout does (T 1,
no top-k/top-p, no repeat blocking, --limit new tokens), the teacher and the student score every
sampled token, and the rows are split into finished (EOS before the limit) and cut.

    python bench/rewards_by_stop.py --teacher runs/compare/teacher/sft/final \
        --student sft=runs/compare/main/sft/sft/final --student minillm=runs/compare/main/minillm/minillm/final \
        --train runs/compare/main/data/train.jsonl --json docs/eos/rewards_by_stop.json

Prints a table and writes bench/results/rewards_by_stop.json (and --json if given).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import arguments, write

from minidistill import data, models
from minidistill.generation.evaluation import generate_ids
from minidistill.reporting.analysis import with_eos


def token_logps(model, prompt: list[int], response: list[int], eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of ``response``'s tokens after ``prompt``, log P(EOS) at each of those positions),
    from one teacher-forced forward, float32."""
    ids = torch.tensor([prompt + response])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0], logp[:, eos]


def summarise(rewards: list[torch.Tensor], cut: list[bool], tail: int) -> dict:
    """Per kind of row (finished / cut): rows, mean length, token-mean reward, row-mean reward
    (the length-normalised return of the row's first token), and the token-mean reward of the
    last ``tail`` tokens of the cut rows."""
    out = {}
    for kind, want in (("finished", False), ("cut", True)):
        rows = [r for r, c in zip(rewards, cut) if c == want and len(r)]
        if not rows:
            out[kind] = {"rows": 0}
            continue
        flat = torch.cat(rows)
        out[kind] = {
            "rows": len(rows),
            "mean_length": sum(len(r) for r in rows) / len(rows),
            "token_mean_reward": float(flat.mean()),
            "row_mean_reward": sum(float(r.mean()) for r in rows) / len(rows),
        }
        if want:
            out[kind]["tail_token_mean_reward"] = float(torch.cat([r[-tail:] for r in rows]).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", action="append", required=True, metavar="NAME=FOLDER")
    ap.add_argument("--train", required=True, help="instructions (JSONL) whose first --n prompts are sampled")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--limit", type=int, default=96, help="max new tokens of a rollout")
    ap.add_argument("--tail", type=int, default=32, help="tokens at the end of the cut rows measured alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="rewards_by_stop", help="bench/results/<out>.json")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    for item in args.student:
        if not all(item.partition("=")[::2]):
            ap.error(f"--student: expected NAME=FOLDER, got '{item}'")
    torch.set_num_threads(args.threads)
    dtype = models.resolve_precision(args.dtype, "cpu")
    t0 = time.perf_counter()
    teacher, tok = models.load_model(args.teacher, dtype=dtype)
    models.freeze(teacher)
    examples = data.load_instructions(args.train)[: args.n]
    prompts, _, _ = data.tokenize_prompts(examples, tok, template="alpaca", max_prompt_length=256)
    eos = tok.eos_token_id
    results = {}
    print(f"{'student':10s} {'kind':9s} {'rows':>4s} {'length':>6s} {'r/token':>8s} {'r/row':>8s} {'tail r':>8s}")
    for item in args.student:
        name, _, folder = item.partition("=")
        student, _ = models.load_model(folder, dtype=dtype)
        models.freeze(student)
        gens = generate_ids(
            student, tok, prompts, max_new_tokens=args.limit, batch_size=16, seed=args.seed, progress=False
        )
        stopped = [len(g) < args.limit for g in gens]
        rewards, cut, eos_rewards, p_eos, q_eos = [], [], [], [], []
        # the EOS token is part of a finished rollout (scored as the evaluation scores samples)
        for p, resp, ended in zip(prompts, with_eos(gens, stopped, eos), stopped):
            (lp, lp_eos), (lq, lq_eos) = (
                token_logps(teacher, list(p), resp, eos),
                token_logps(student, list(p), resp, eos),
            )
            r = lp - lq
            rewards.append(r[:-1] if ended else r)  # the rest of the row; the EOS token's reward apart
            cut.append(not ended)
            if ended:
                eos_rewards.append(float(r[-1]))
            p_eos.append(lp_eos.exp())
            q_eos.append(lq_eos.exp())
        pe, qe = torch.cat(p_eos), torch.cat(q_eos)
        results[name] = {
            "folder": folder,
            **summarise(rewards, cut, args.tail),
            # where the single-step term moves q(EOS): P(EOS) of teacher and student at every rollout position
            "eos": {
                "stop_token_mean_reward": sum(eos_rewards) / max(len(eos_rewards), 1),
                "positions": len(pe),
                "mean_p_eos": float(pe.mean()),
                "mean_q_eos": float(qe.mean()),
                "share_q_above_p": float((qe > pe).float().mean()),
            },
        }
        for kind in ("finished", "cut"):
            s = results[name][kind]
            if s["rows"]:
                tail = f"{s['tail_token_mean_reward']:8.2f}" if kind == "cut" else f"{'':8s}"
                print(
                    f"{name:10s} {kind:9s} {s['rows']:4d} {s['mean_length']:6.1f} "
                    f"{s['token_mean_reward']:8.2f} {s['row_mean_reward']:8.2f} {tail}"
                )
        e = results[name]["eos"]
        print(
            f"{name:10s} EOS token reward {e['stop_token_mean_reward']:.2f}; over {e['positions']} positions: "
            f"mean P(EOS) teacher {e['mean_p_eos']:.4f}, student {e['mean_q_eos']:.4f}, "
            f"student above teacher at {e['share_q_above_p']:.2f}"
        )
        del student
    write(
        args.out,
        {
            "threads": args.threads,
            "args": arguments(args),
            "dtype": dtype,
            "results": results,
            "seconds": time.perf_counter() - t0,
        },
        copy_to=args.json,
    )


if __name__ == "__main__":
    main()

"""How far the sampler's log q (KV-cached decoding) is from the loss's (one full forward), and what
rescoring costs: the measurement behind MiniLLM's ``recompute_logp: auto`` (on in bf16/fp16).

Teacher SmolLM2-135M-Instruct, student = every 3rd layer (or ``--student FOLDER``, e.g. a
quickstart SFT student), 16 prompts x 48 new tokens, a = 0 and a = 0.2, in bf16 autocast and fp32.
At the first PPO epoch rho = q_theta / p~ should be exactly w_t; with the sampler's log q it is off
by exp(delta log q). ``--tiny``: random toy models (seconds).

  PYTHONPATH=. .venv/bin/python bench/behaviour_logp.py [--student runs/quickstart/sft/final]

Writes ``bench/results/behaviour_logp.json`` and prints one line per setting.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator
from common import machine, prompt_texts, smollm2, write

from minidistill import data, models
from minidistill.generation.sampler import sample, score


def measure(student, teacher, tok, precision: str, alpha: float, n: int, new_tokens: int) -> dict:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # one Accelerator per precision in this process
    acc = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=True)
    t_model = teacher.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    prompts = [tok(p).input_ids for p in prompt_texts(tok, n, max_tokens=256)]
    ids, mask = data.collate_prompts(prompts, tok.pad_token_id)
    t0 = time.perf_counter()
    with acc.autocast():
        ro = sample(
            student,
            t_model,
            ids,
            mask,
            max_new_tokens=new_tokens,
            mix_alpha=alpha,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(0),
            vocab=len(tok),
        )
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    with acc.autocast():
        logq, _ = score(student, ro, keep_hidden=False, chunk=8, vocab=len(tok))
    t_rescore = time.perf_counter() - t0
    valid = ro.response_mask.bool()
    d = (logq - ro.student_logp)[valid]
    rho = d.exp()
    return {
        "precision": precision,
        "mix_alpha": alpha,
        "tokens": int(valid.sum()),
        "mean_abs_dlogq": float(d.abs().mean()),
        "max_abs_dlogq": float(d.abs().max()),
        "frac_abs_dlogq_gt_1e-2": float((d.abs() > 1e-2).float().mean()),
        "rho_first_epoch_min": float(rho.min()),
        "rho_first_epoch_max": float(rho.max()),
        "sample_s": t_sample,
        "rescore_s": t_rescore,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default=None, help="student folder (default: every 3rd teacher layer)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    teacher, student, tok = smollm2(tiny=args.tiny)
    if args.student:
        student = models.load_model(args.student, dtype="fp32", device="cpu", with_tokenizer=False)
    student.eval()
    rows = []
    for precision in ("bf16", "fp32"):
        for alpha in (0.0, 0.2):
            row = measure(student, teacher, tok, precision, alpha, args.prompts, args.new_tokens)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            rows.append(row)
    write(
        "behaviour_logp" + ("_tiny" if args.tiny else ""),
        {"student": args.student or "teacher layers 0,3,6,...", "rows": rows, "machine_detail": machine()},
    )


if __name__ == "__main__":
    main()

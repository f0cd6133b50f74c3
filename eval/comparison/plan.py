"""The comparison's plan: every setting, validated and resolved from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minidistill.errors import UserError
from minidistill.generation.evaluation import parse_int_list
from minidistill.pipeline.launch import device_type, use_cpu
from minidistill.training.checkpoint import write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cpu"  # every model of the comparison trains and is scored here (TRL too: use_cpu)

ABLATIONS = {  # minillm.yaml with one part of the method switched off (the paper's Table 5/6 ablations)
    "minillm_a0": {"mix_alpha": 0.0},
    "minillm_nolen": {"length_norm": False},
    "minillm_nosingle": {"single_step": False},
    "minillm_const": {"mix_alpha_end": 0.2},  # a constant, the default before 2026-12-06 (issue 24)
    "minillm_split": {"student_rows": 0.5},  # half of each buffer at a = 0 carries the long-term term
    "minillm_long": {"rollouts_x": 2},  # rollouts twice --gen-tokens long (above the evaluation limit)
    "minillm_mask": {"mask_truncated": True},  # rows cut at the limit carry no long-term term
    "minillm_split_mask": {"student_rows": 0.5, "mask_truncated": True},
}
METHODS = ("sft", "kd", "seqkd", "minillm", "trl", "sft_long", *ABLATIONS)
FROM_SFT = ("minillm", "trl", "sft_long", *ABLATIONS)  # start at sft/final
RECIPE_OF = {"sft_long": "sft", **{name: "minillm" for name in ABLATIONS}}
CONTROLS = ("sft_long", *ABLATIONS)  # scored on --control-tests / --control-examples
RECIPES = REPO_ROOT / "recipes" / "compare"
TEST_SETS = {"dolly_test": "instruct/dolly_test.jsonl", "sinst_test": "instruct/sinst_test.jsonl"}
TRAIN_SET = "instruct/dolly_dev.jsonl"
CORPUS = ("corpus/wiki_demo.txt", "corpus/c4_demo.jsonl", "corpus/tinyshakespeare.txt")
MINILLM_CORPUS = ("corpus/wiki_demo.txt", "corpus/c4_demo.jsonl")  # L_PT text (as recipes/compare/minillm.yaml)


@dataclass(frozen=True)
class Plan:
    """Every setting of one comparison run, validated, with every input path resolved
    (:meth:`from_args`). Saved under ``settings`` in results.json (less ``progress`` and ``overwrite``)."""

    methods: list[str]
    steps: int
    minillm_steps: int
    batch_size: int
    train_examples: int
    train_examples_auto: bool
    gen_tokens: int
    lr: float | None
    start_steps: int
    layer_stride: int
    seeds: list[int]
    exacc_lengths: list[int]
    bootstrap: int
    eval_start: bool
    publish: str | None
    max_examples: int
    max_new_tokens: int
    eval_batch_size: int
    eval_dtype: str
    precision: str
    seed: int
    minillm_seed: int | None
    threads: int
    out: str
    overwrite: bool
    progress: bool
    teacher: str
    train: str
    tests: dict[str, str]
    control_tests: list[str]
    control_examples: int
    corpus: list[str]
    lpt_corpus: list[str]
    tiny: bool
    template: str
    block_len: int
    valid_blocks: int
    max_prompt_length: int
    max_length: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
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
        precision_device = device_type(DEVICE, use_cpu(DEVICE))
        return cls(
            methods=methods,
            steps=args.steps,
            minillm_steps=args.minillm_steps or args.steps,
            batch_size=args.batch_size,
            train_examples=args.train_examples or args.steps * args.batch_size,
            train_examples_auto=args.train_examples is None,
            gen_tokens=args.gen_tokens,
            lr=args.lr,
            start_steps=args.start_steps,
            layer_stride=args.layer_stride,
            seeds=seeds,
            exacc_lengths=exacc_lengths,
            bootstrap=args.bootstrap,
            eval_start=args.eval_start,
            publish=str(Path(args.publish).resolve()) if args.publish else None,
            max_examples=args.max_examples,
            max_new_tokens=args.max_new_tokens,
            eval_batch_size=args.eval_batch_size,
            eval_dtype=models.resolve_precision(args.eval_dtype, precision_device),
            precision=models.resolve_precision(args.precision, precision_device),
            seed=args.seed,
            minillm_seed=args.minillm_seed,
            threads=args.threads,
            out=str(Path(args.out).resolve()),
            overwrite=args.overwrite,
            progress=not args.no_progress,
            teacher=args.teacher,
            train=train,
            tests=tests,
            control_tests=control_tests,
            control_examples=args.control_examples or args.max_examples,
            corpus=corpus,
            lpt_corpus=lpt_corpus,
            tiny=args.tiny,
            template="alpaca",
            **sizes,
        )

    def settings(self) -> dict[str, Any]:
        """The plan as results.json records it (``progress`` and ``overwrite`` left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("progress", "overwrite")}


def method_steps(method: str, plan: Plan) -> int:
    return plan.minillm_steps if method in FROM_SFT else plan.steps


def warmup(steps: int) -> int:
    return max(1, steps // 10)


def describe_plan(plan: Plan) -> str:
    lrs = {m: plan.lr if plan.lr is not None else method_lr(m) for m in plan.methods}
    on_sft = [m for m in plan.methods if m in FROM_SFT]
    return "\n".join(
        [
            f"comparison plan -> {plan.out}",
            f"  teacher {plan.teacher}; start: layer stride {plan.layer_stride}, {plan.start_steps} PD steps (recipes/compare/start.yaml)",
            f"  from the start, {plan.steps} optimizer steps x batch {plan.batch_size}: "
            + ", ".join(m for m in plan.methods if m not in FROM_SFT)
            + (f"; from sft/final, {plan.minillm_steps} more: {', '.join(on_sft)}" if on_sft else ""),
            f"  cosine LR, 10% warm-up; {plan.train_examples} training prompts, training generations "
            f"<= {plan.gen_tokens} tokens, precision {plan.precision}; training seed {plan.seed}"
            + (f" ({', '.join(on_sft)}: {plan.minillm_seed})" if plan.minillm_seed is not None and on_sft else ""),
            "  learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in lrs.items()),
            f"  eval: teacher{', start' if plan.eval_start else ''} + main methods on {', '.join(plan.tests)}, "
            f"(<= {plan.max_examples} items each), sft_long and ablations on {', '.join(plan.control_tests)} "
            f"(<= {plan.control_examples} items), "
            f"seeds {','.join(map(str, plan.seeds))}, <= {plan.max_new_tokens} new tokens, "
            f"batch {plan.eval_batch_size}, {plan.eval_dtype}; ExAccErr at {plan.exacc_lengths}",
            f"  threads {plan.threads}" + (f"; publishing to {plan.publish}" if plan.publish else ""),
        ]
    )


def stage_seed(method: str, plan: Plan) -> int:
    """Training seed of ``method``: --minillm-seed for the methods that start from the SFT student
    (another draw of their data order and rollouts on the same start and SFT), else --seed."""
    if method in FROM_SFT and plan.minillm_seed is not None:
        return plan.minillm_seed
    return plan.seed


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
    "minillm_seed",
    "precision",
    "template",
    "corpus",
    "lpt_corpus",
    "tiny",
)


def check_same_training(plan: Plan) -> None:
    """A folder holds one experiment: its training settings are saved in <out>/training.json at the
    first run, and a rerun with others is refused (one line) before anything is written."""
    path = Path(plan.out) / "training.json"
    mine = {k: getattr(plan, k) for k in TRAINING_KEYS}
    if path.is_file() and not plan.overwrite:
        saved = json.loads(path.read_text())
        changed = [k for k in TRAINING_KEYS if saved.get(k) != mine[k]]
        if changed:
            raise UserError(
                f"{plan.out}: trained with other settings ({', '.join(f'{k} {saved.get(k)!r}' for k in changed)}); "
                "rerun with --overwrite or another --out"
            )
    write_json_atomic(path, mine)

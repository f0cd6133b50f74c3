"""Evaluate models against the teacher on the validation prompts (no training).

For each entry of ``models`` ("teacher", "student" = the current student, or the name of an
earlier stage, whose ``final/`` is loaded; ``<stage>/best`` for its best checkpoint) it samples
responses, scores ROUGE-L against the split's references (the teacher's responses after a
``generate`` stage), the share of responses that stop with EOS before ``max_new_tokens`` (set
it well above a training stage's limit to see whether the student still stops), and measures
per-token KL to the teacher: reverse KL(q||p) on the model's
own samples and forward KL(p||q) on the teacher's samples, through :func:`minidistill.parts.scoring.score_model`
(as eval/analyze.py and eval/compare.py are). Models are scored in the recipe's
precision: a bf16 run evaluates bf16 copies of its students (like the teacher, which is held in
bf16), which on CPU generates about 1.7x faster than fp32 weights under autocast. Writes
``<output_dir>/eval_table.json`` (which the run report turns into a table and a bar chart) and
prints the table; ``<output_dir>/eval_examples.json`` holds the answers of every model to the first
``examples`` prompts (first seed), which the report shows side by side.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from rich.table import Table

from minidistill import data, models
from minidistill.config import opt
from minidistill.errors import UserError
from minidistill.generation.evaluation import Sampling
from minidistill.parts import scoring
from minidistill.reporting.tracking import console
from minidistill.stages import Stage
from minidistill.training import checkpoint as ckpt


@dataclass
class Config:
    type: str = opt("evaluate", "Stage type.")
    name: str = opt("", "Stage name.")
    models: list[str] = opt(
        ["teacher", "student"], "What to score: teacher, student (current), <stage> or <stage>/best."
    )
    split: str = opt("valid", "Instruction split to score on.", choices=["train", "valid"])
    max_examples: int = opt(64, "Prompts scored.", min=1)
    seeds: list[int] = opt([10], "Sampling seeds (paper: 10,20,30,40,50).")
    max_new_tokens: int = opt(128, "Response token limit.", min=1)
    batch_size: int = opt(16, "Generation batch size.", min=1)
    no_repeat_ngram_size: int = opt(0, "No-repeat n-gram size at sampling time (paper's test-time setting: 6).", min=0)
    examples: int = opt(
        3,
        "Prompts whose answers (every model, first seed) go to eval_examples.json and side by side into report.md.",
        min=0,
    )


def _load(run, name: str):
    """The model ``name`` as evaluation runs it, in the run's precision (see the module docstring)."""
    if name == "teacher":
        return run.teacher.model
    folder = run.stage_dir(name) if "/" in name else run.stage_dir(name) / "final"
    if not ckpt.is_complete(folder)[0]:
        raise UserError(f"evaluate.models: '{name}' has no complete model at {folder} (name an earlier stage)")
    model = models.load_model(str(folder), device=run.device, with_tokenizer=False)
    return model.to(models.DTYPES[run.precision]).eval()


def _eval_copy(run, student):
    """The live student in the run's precision: a copy, so its fp32 master weights stay untouched
    (the student itself in an fp32 run)."""
    dtype = models.DTYPES[run.precision]
    model = run.accelerator.unwrap_model(student)
    if dtype == torch.float32:
        return model
    return copy.deepcopy(model).to(dtype).eval()


def example_answers(examples: list, kept: list[int], scores: list[tuple[str, object]], n: int, seed: int) -> list[dict]:
    """The answers of every scored model to the first ``n`` scored prompts, on sampling seed ``seed``:
    [{"instruction", "input", "answers": {model: {"text", "stopped", "tokens"}}}] in prompt order.
    ``kept[i]``: the example behind prompt i; ``scores``: (model name, its :class:`scoring.Score`)."""
    out = []
    for i in range(min(n, len(kept))):
        ex = examples[kept[i]]
        answers = {}
        for name, sc in scores:
            at = zip(sc.samples.prompt_index, sc.samples.seed)
            k = next((k for k, (p, s) in enumerate(at) if p == i and s == seed), None)
            if k is None:
                continue
            answers[name] = {
                "text": sc.texts[k],
                "stopped": bool(sc.samples.ended[k]),
                "tokens": len(sc.samples.responses[k]),
            }
        out.append({"instruction": ex.instruction, "input": ex.input, "answers": answers})
    return out


def evaluate_models(run, cfg: Config, student) -> tuple[list[dict], list[dict]]:
    """The evaluation rows (one per model) and the example answers (:func:`example_answers`)."""
    d = run.recipe.data
    examples = run.instructions(cfg.split)[: cfg.max_examples]
    if not examples:
        raise UserError(
            f"stage '{cfg.name}'.split: the '{cfg.split}' split is empty (set data.valid or data.valid_size)"
        )
    prompts, refs, stats = data.tokenize_prompts(
        examples, run.tokenizer, template=d.template, max_prompt_length=d.max_prompt_length, long_prompt=d.long_prompt
    )
    sampling = Sampling(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, no_repeat_ngram_size=cfg.no_repeat_ngram_size
    )
    teacher = run.teacher.model

    def score(model, teacher_samples=None):
        with torch.no_grad():
            return scoring.score_model(
                model,
                teacher,
                run.vocab_size,
                run.tokenizer,
                prompts,
                sampling=sampling,
                seeds=cfg.seeds,
                references=refs,
                teacher_samples=teacher_samples,
            )

    t_score = score(teacher)
    rows, scores = [], []
    for name in cfg.models:
        model = _eval_copy(run, student) if name == "student" else _load(run, name)
        was_training = model.training
        model.eval()
        sc = t_score if model is teacher else score(model, t_score.samples)
        model.train(was_training)
        scores.append((name, sc))
        rows.append(
            {
                "model": name,
                "rougeL": sc.rouge_l,
                "reverse_kl": 0.0 if model is teacher else sc.reverse_kl,
                "forward_kl": 0.0 if model is teacher else sc.forward_kl,
                "mean_length": sc.mean_length,
                "eos_rate": sc.eos_rate,
                "max_new_tokens": cfg.max_new_tokens,
                "n_prompts": len(prompts),
                "seeds": list(cfg.seeds),
            }
        )
    return rows, example_answers(examples, stats.kept_indices, scores, cfg.examples, cfg.seeds[0]) if cfg.seeds else []


def print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("model", "ROUGE-L", "reverse KL", "forward KL", "mean length", "EOS rate"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(
            r["model"],
            f"{r['rougeL']:.1f}",
            f"{r['reverse_kl']:.3f}",
            f"{r['forward_kl']:.3f}",
            f"{r['mean_length']:.1f}",
            f"{r['eos_rate']:.2f}",
        )
    console.print(table)


def run(run, cfg: Config, student) -> None:
    rows, answers = evaluate_models(run, cfg, student)
    if run.accelerator.is_main_process:
        path = run.out_dir / "eval_table.json"
        ckpt.write_json_atomic(path, rows)
        if answers:
            ckpt.write_json_atomic(run.out_dir / "eval_examples.json", answers)
        print_table(
            rows,
            f"{cfg.name}: {rows[0]['n_prompts']} {cfg.split} prompts, seeds {cfg.seeds}, at most "
            f"{cfg.max_new_tokens} new tokens (ROUGE-L vs references; KL in nats/token; EOS rate = share "
            "of responses that stopped)",
        )
        console.print(f"evaluation table: {path}")
        run.log(
            cfg.name,
            0,
            {
                f"{r['model']}/{k}": r[k]
                for r in rows
                for k in ("rougeL", "reverse_kl", "forward_kl", "mean_length", "eos_rate")
            },
        )
    return None


def cross_tokenizer(cfg) -> tuple[str, str]:
    """``Stage.cross_tokenizer``: the KL columns compare teacher and student token by token."""
    return "", (
        "measures per-token KL between teacher and student, which needs one vocabulary: score each model "
        "with eval/instruct_eval.py instead"
    )


def served_teacher(cfg, logprobs: int) -> str:
    """``Stage.served_teacher``: the KL columns need the teacher's full distribution."""
    return "its KL columns need the teacher's full distribution; score the students with eval/instruct_eval.py"


STAGE = Stage(
    "evaluate",
    Config,
    run,
    trains=False,
    generates=True,
    needs_instructions=True,
    cross_tokenizer=cross_tokenizer,
    served_teacher=served_teacher,
)

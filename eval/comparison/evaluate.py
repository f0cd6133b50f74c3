"""Scoring each model of the comparison (through minidistill.parts.scoring), saved and reused per model."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from minidistill.training.checkpoint import write_json_atomic, write_text_atomic

from .methods import fingerprint
from .plan import Plan
from .stats import ci95


def eval_settings(plan: Plan) -> dict:
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
    return {k: getattr(plan, k) for k in keys}


def evaluate_model(
    name: str, model, teacher, tokenizer, plan: Plan, tests: list[str], teacher_samples, max_examples: int
) -> dict:
    """ROUGE-L per seed and item, and the analyses, on the test sets ``tests``, through
    :func:`minidistill.parts.scoring.score_model` (the KLs and ExAccErr on the first seed's samples).

    Returns {"datasets": {test set: metrics}, "item_scores": {test set: {index: [ROUGE-L per seed]}},
    "samples": {test set: {index: (prompt ids, first-seed generation ids)}}}. With a teacher, the
    metrics include the KLs and ExAccErr (``teacher_samples``: the teacher's first-seed samples).
    """
    import torch

    from minidistill.data import load_instructions, render_prompt, tokenize_prompts
    from minidistill.generation.evaluation import Sampling, generation_record
    from minidistill.parts import scoring
    from minidistill.reporting import analysis as A

    out_dir = Path(plan.out) / "eval" / name
    vocab, limit = len(tokenizer), plan.max_new_tokens
    first = plan.seeds[0]
    # the MiniLLM protocol: T 1, top-p 1, top-k 0, no-repeat-ngram 6
    sampling = Sampling(
        max_new_tokens=limit, batch_size=plan.eval_batch_size, no_repeat_ngram_size=6, progress=plan.progress
    )
    results, samples, item_scores = {}, {}, {}
    for ds in tests:
        examples = load_instructions(plan.tests[ds])[:max_examples]
        prompts, refs, stats = tokenize_prompts(
            examples, tokenizer, template=plan.template, max_prompt_length=plan.max_prompt_length
        )
        t_samples, t_prompts = None, None
        if teacher is not None:  # the teacher's first-seed samples of the items this model is scored on
            t_own, kept = teacher_samples[ds], set(stats.kept_indices)
            idx = [i for i in sorted(t_own) if i in kept]
            t_prompts = [t_own[i][0] for i in idx]
            t_samples = A.Samples(
                prompt_index=list(range(len(idx))),
                seed=[first] * len(idx),
                responses=[list(t_own[i][1]) for i in idx],
                ended=[len(t_own[i][1]) < limit for i in idx],
                rkl=[[] for _ in idx],
                fkl=[[] for _ in idx],
            )
        with torch.inference_mode():
            sc = scoring.score_model(
                model,
                teacher,
                vocab,
                tokenizer,
                prompts,
                sampling=sampling,
                seeds=plan.seeds,
                references=refs,
                teacher_samples=t_samples,
                teacher_prompts=t_prompts,
                kl_seeds=[first],
            )
        own_samples = sc.samples
        prompt_texts = [render_prompt(examples[i], plan.template, tokenizer) for i in stats.kept_indices]
        gens = []
        for k, p in enumerate(own_samples.prompt_index):
            i = stats.kept_indices[p]
            gens.append(
                generation_record(
                    examples[i],
                    i,
                    prompt_texts[p],
                    refs[p],
                    own_samples.seed[k],
                    sc.texts[k],
                    sc.rouge[k],
                    own_samples.responses[k],
                    prompts[p],
                )
            )
        rouge_by_seed = scoring.mean_by_seed(sc.rouge, own_samples.seed)
        length_by_seed = scoring.mean_by_seed([len(r) for r in own_samples.responses], own_samples.seed)
        per_seed = [rouge_by_seed[s] for s in plan.seeds]
        mean, half = ci95(per_seed)
        dist4 = [A.distinct_n([g["generation"] for g in gens if g["seed"] == s], 4) for s in plan.seeds]
        own = sorted((g for g in gens if g["seed"] == first), key=lambda g: g["index"])
        samples[ds] = {g["index"]: (g["prompt_ids"], g["generation_ids"]) for g in own}
        scores: dict[int, list[float]] = {}
        for g in sorted(gens, key=lambda g: (g["index"], plan.seeds.index(g["seed"]))):
            scores.setdefault(g["index"], []).append(g["rougeL"])
        item_scores[ds] = scores
        m: dict[str, Any] = {
            "rougeL": mean,
            "rougeL_ci95": half,
            "rougeL_per_seed": {str(s): v for s, v in zip(plan.seeds, per_seed)},
            "mean_length": sum(length_by_seed.values()) / len(length_by_seed),
            "eos_rate": sc.eos_rate,
            "distinct_4": sum(dist4) / len(dist4),
            "n_examples": stats.n_kept,
            "n_dropped_long_prompt": stats.n_dropped_long_prompt,
            "reverse_kl_own_samples": None,
            "forward_kl_teacher_samples": None,
            "reverse_kl_gold": None,
            "forward_kl_gold": None,
            "exaccerr": None,
        }
        if teacher is not None:
            m["reverse_kl_own_samples"] = sc.reverse_kl
            m["forward_kl_teacher_samples"] = sc.forward_kl
            # ExAccErr(l): forward KL(p||q) summed along the model's own samples (R) against along
            # the teacher's (l*eps), the same first-seed samples, errors 0 after a sample's EOS.
            curve = A.exaccerr_curve(
                [f for f, s in zip(own_samples.fkl, own_samples.seed) if s == first],
                sc.teacher_samples.fkl,
                plan.exacc_lengths,
            )
            m["exaccerr"] = {str(k): A.finite_or_none(v) for k, v in zip(curve["lengths"], curve["exaccerr"])}
            with torch.inference_mode():
                gold, _, _ = scoring.gold_kl(
                    model,
                    teacher,
                    vocab,
                    tokenizer,
                    examples,
                    template=plan.template,
                    max_prompt_length=plan.max_prompt_length,
                    max_length=plan.max_length,
                    batch_size=plan.eval_batch_size,
                )
            m["reverse_kl_gold"], m["forward_kl_gold"] = gold["reverse_kl"], gold["forward_kl"]
        results[ds] = m
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            out_dir / f"{ds}.generations.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in gens)
        )
    return {"datasets": results, "item_scores": item_scores, "samples": samples}


def load_samples(name: str, plan: Plan) -> dict:
    """First-seed (prompt ids, generation ids) per test item, from a saved generations file."""
    samples = {}
    for ds in plan.tests:
        path = Path(plan.out) / "eval" / name / f"{ds}.generations.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        samples[ds] = {r["index"]: (r["prompt_ids"], r["generation_ids"]) for r in rows if r["seed"] == plan.seeds[0]}
    return samples


class Evaluator:
    """Holds the teacher (and its first-seed samples) while the models are evaluated one by one."""

    def __init__(self, plan: Plan):
        import torch

        from minidistill import models

        torch.set_num_threads(plan.threads)
        self.plan, self.settings = plan, eval_settings(plan)
        self.teacher, self.tokenizer = models.load_model(plan.teacher, dtype=plan.eval_dtype)
        models.freeze(self.teacher)
        self.teacher_samples = None
        self.summaries: dict[str, dict] = {}

    def __call__(self, name: str, folder: Path | None, tests: list[str], max_examples: int | None = None) -> dict:
        """Evaluate (or reuse the saved evaluation of) a model folder; None = the teacher, which
        must come first. Returns the summary (also saved as <out>/eval/<name>/summary.json)."""
        from minidistill import models

        plan = self.plan
        summary = Path(plan.out) / "eval" / name / "summary.json"
        key = {
            "settings": self.settings,
            "model": str(folder) if folder else plan.teacher,
            "fingerprint": fingerprint(folder) if folder else None,
            "tests": tests,
            "max_examples": None if max_examples in (None, plan.max_examples) else max_examples,  # None: the plan's
        }
        n_items = key["max_examples"] or plan.max_examples
        if not plan.overwrite and summary.is_file():
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
            model, tok = models.load_model(str(folder), dtype=plan.eval_dtype)
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

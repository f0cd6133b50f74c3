"""The comparison's tables and results.json (in --out, and in --publish)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from minidistill.training.checkpoint import write_json_atomic, write_text_atomic

from .plan import ABLATIONS, Plan
from .stats import statistics


def _num(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _ci(c: dict | None, spec: str = ".2f") -> str:
    if c is None:
        return "-"
    lo, hi = c["ci95"]
    return f"{format(c.get('mean', c.get('diff')), spec)} [{format(lo, spec)}, {format(hi, spec)}]"


def _seeds(plan: dict) -> str:
    """', training seed S (MiniLLM, TRL and the ablations: M)' for the table's header; '' for a
    results.json that does not record it."""
    if plan.get("seed") is None:
        return ""
    other = plan.get("minillm_seed")
    return f", training seed {plan['seed']}" + (
        f" (MiniLLM, TRL and the ablations: {other})" if other is not None else ""
    )


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
        f"training prompts{_seeds(plan)}. ROUGE-L x100 with a 95% bootstrap CI over items (each item's score averaged over "
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
            f"Ablations (each from the SFT student, the same budget as minillm; scored on the first "
            f"{plan['control_examples']} items unless the items column says otherwise; the paired difference is "
            "over the items both scored; below 0 means switching that part off hurts):",
            "",
            "| ablation | steps | train s | test set | items | ROUGE-L [95% CI] | ablation - minillm [95% CI] |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        for name in abl:
            _, steps, secs = budget(name)
            for t in ev[name]:
                n_items = paired.get(f"{name} - minillm", {}).get(t, {}).get("n_items")
                lines.append(
                    f"| {name} | {steps} | {secs} | {t} | {_num(n_items, 'd')} | {_ci(ci[name].get(t))} "
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


def assemble(settings: dict, train_data: dict, training: dict, summaries: dict[str, dict], n_bootstrap: int) -> dict:
    """results.json's content from the models' summaries: the statistics recomputed over all of them,
    each model's evaluation time added to ``training`` (in place)."""
    ci, paired = statistics(summaries, n_bootstrap, ABLATIONS)
    for name, sm in summaries.items():
        training.setdefault(name, {})["eval_seconds"] = sm.get("seconds")
    return {
        "settings": settings,
        "train_data": train_data,
        "training": training,
        "models": {name: sm["datasets"] for name, sm in summaries.items()},
        "rougeL_ci": ci,
        "paired": paired,
        "definitions": DEFINITIONS,
    }


def write_results(folder: Path, results: dict, table: str) -> None:
    """results.json and table.md into ``folder``, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "results.json", results)
    write_text_atomic(folder / "table.md", table)


def write_report(plan: Plan, train_info: dict, training: dict, summaries: dict[str, dict], t_all: float) -> dict:
    """results.json and table.md from everything evaluated so far (in --out, and in --publish)."""
    results = assemble(plan.settings(), train_info, training, summaries, plan.bootstrap)
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    table = make_table(results)
    for folder in [Path(plan.out)] + ([Path(plan.publish)] if plan.publish else []):
        write_results(folder, results, table)
    if plan.publish:
        for name in summaries:
            src = Path(plan.out) / "eval" / name / "summary.json"
            write_text_atomic(Path(plan.publish) / f"{name}.summary.json", src.read_text())
    return results

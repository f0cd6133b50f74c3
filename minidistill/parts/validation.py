"""Validation every training stage shares: held-out sums over a process's share of the data (at
most ``eval_batches`` batches), all-reduced over processes, and sampled ROUGE-L on validation
prompts. The loop calls the ``evaluate(model)`` these return under ``no_grad`` and the run's
autocast, and logs the dict as ``valid/*``."""

from __future__ import annotations

import math
from typing import Callable

import torch

from minidistill.generation import evaluation


def held_out(
    run, cfg, items, names: tuple[str, ...], batch_of: Callable, sums_of: Callable, finish: Callable
) -> Callable:
    """``evaluate(model) -> dict`` over ``items`` (a list or a tensor of rows).

    Each process takes every ``world``-th item; batches of ``cfg.batch_size`` (at most
    ``cfg.eval_batches``) go through ``batch_of(items, start)`` (``start``: the batch's first index
    in this process's share, for caches) and ``sums_of(model, batch, start) -> {name: sum}`` (``names``: every
    name, so a process without a share still takes part in the all-reduce); the named float32
    sums are added up, summed over processes and handed to ``finish(totals)``, which turns them
    into metrics."""
    acc = run.accelerator

    def evaluate(model) -> dict:
        mine = items[acc.process_index :: acc.num_processes]
        totals = {k: torch.zeros((), device=run.device) for k in names}
        for n, i in enumerate(range(0, len(mine), cfg.batch_size)):
            if cfg.eval_batches is not None and n >= cfg.eval_batches:
                break
            batch = batch_of(mine[i : i + cfg.batch_size], i)
            for k, v in sums_of(model, batch, i).items():
                totals[k] += torch.as_tensor(v, device=run.device).float()
        return finish({k: acc.reduce(v, "sum") for k, v in totals.items()})

    return evaluate


def per_token(total, count) -> float:
    """A summed loss per counted unit (0 units count as 1)."""
    return float(total / count.clamp(min=1))


def loss_and_ppl(loss: float) -> dict:
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


def sampled_rouge(run, examples: list, *, max_new_tokens: int, batch_size: int) -> Callable:
    """``evaluate(model)``: sample one response per validation prompt (the recipe's seed) and
    score ROUGE-L against the references, over every process's share; {rougeL, mean_length}."""
    acc = run.accelerator
    d = run.recipe.data
    mine = examples[acc.process_index :: acc.num_processes]

    def evaluate(model) -> dict:
        res = {"n_examples": 0, "rougeL": 0.0, "mean_length": 0.0}  # a process with no share adds nothing
        if mine:
            res = evaluation.evaluate_instructions(
                model,
                run.tokenizer,
                mine,
                template=d.template,
                seeds=[run.recipe.seed],
                max_prompt_length=d.max_prompt_length,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=False,
                vocab_size=run.vocab_size,
            )
        n = torch.tensor(float(res["n_examples"]), device=acc.device)
        score = torch.tensor(res["rougeL"] * res["n_examples"], device=acc.device)
        length = torch.tensor(res["mean_length"] * res["n_examples"], device=acc.device)
        n, score, length = acc.reduce(n, "sum"), acc.reduce(score, "sum"), acc.reduce(length, "sum")
        return {"rougeL": float(score / n.clamp(min=1)), "mean_length": float(length / n.clamp(min=1))}

    return evaluate

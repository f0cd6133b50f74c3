"""The one training loop every stage uses.

A stage hands the loop three things:
- a *batch source*: ``next_batch() -> dict`` (an endless stream: it reshuffles per epoch, or
  for MiniLLM walks its explicit collect -> ppo_epochs x minibatches iteration), ``state_dict()``
  and ``load_state_dict()`` so a resumed run continues at the same batch; every batch carries
  ``num_tokens``, what its loss terms are counted in (see below), known before the forward;
- ``loss_fn(model, batch, step) -> (loss, metrics)``, ``step`` the 0-based index of the optimizer
  update this micro-batch belongs to (the same index the LR scheduler uses for it);
- optionally ``evaluate(model) -> metrics`` with a key to keep the best checkpoint by.

Loss terms. A loss is one or several named *terms*, each a sum over its own units (tokens):
``loss`` is a tensor (one term, named ``"loss"``, counted by ``batch["num_tokens"]``, an int) or
a dict ``{name: sum}`` whose counts are ``batch["num_tokens"] = {name: count}`` (every micro-batch
and process with the same names). Per optimizer step the loop draws ``grad_accum`` micro-batches,
all-reduces each term's count over micro-batches and processes, and back-propagates
``sum_i sum_term / global_count_term`` (times the process count, which DDP's gradient averaging
divides out), so each term is the mean over ITS units of the whole global batch no matter how it
is split into micro-batches or processes (MiniLLM: the rollout term per response token, L_PT per
corpus token). The counts must be known before the first backward of the step, which is why they
come with the batch rather than out of the loss. Then: gradient clipping, a NaN/inf guard,
AdamW, the LR schedule, logging, evaluation, checkpoints.

Logged values are global: ``loss`` is the objective, the sum over terms of each term's global
sum over its global count (one term: the per-token mean over all processes' tokens, as always);
``tokens`` is the global count of the first term; stage metrics are averaged over micro-batches
and processes; only the main process writes them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm
from transformers import get_scheduler

from minidistill.errors import UserError
from minidistill.models import train_mode
from minidistill.reporting.tracking import console, fmt
from minidistill.training import checkpoint as ckpt
from minidistill.training import schedules


@dataclass
class LoopResult:
    model: Any
    step: int
    best: dict | None
    stopped: bool = False
    checkpoint: Path | None = None  # the checkpoint written when stopped by a signal


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"stage '{cfg.name}': the student has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8)


def make_scheduler(optimizer, cfg, total_steps: int):
    """The stage's LR schedule. ``wsd`` is a ``LambdaLR`` over ``schedules.wsd_factor``, the WSD
    definition PD's alpha schedule uses too (bit-identical to transformers' warmup_stable_decay,
    pinned by tests/unit/test_schedules.py); the others are transformers' schedulers."""
    total = max(1, total_steps)
    warm = min(cfg.warmup_steps, total)
    if cfg.scheduler == "wsd":
        phases = schedules.wsd_phases(total_steps, cfg.warmup_steps, cfg.decay_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_wsd_lambda, phases=phases))
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warm, num_training_steps=total)


def _wsd_lambda(step: int, *, phases: tuple[int, int, int]) -> float:
    return schedules.wsd_factor(step, *phases)


def _term_counts(batch: dict) -> dict:
    """``batch["num_tokens"]`` as ``{term: count}`` (an int counts the single term ``"loss"``)."""
    n = batch["num_tokens"]
    return dict(n) if isinstance(n, dict) else {"loss": n}


class GracefulStop:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit non-zero."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        console.print(f"[yellow]signal {signum}: finishing this step, then checkpointing[/]")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def mean_over_processes(acc, metrics: dict) -> dict:
    """Each stage metric averaged over the processes (every process calls this, same keys)."""
    if acc.num_processes == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    t = acc.reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=acc.device), "mean")
    return dict(zip(keys, t.tolist()))


def train(
    run,
    cfg,
    model,
    source,
    loss_fn: Callable,
    total_steps: int,
    *,
    evaluate: Callable | None = None,
    best_by: tuple[str, str] | None = None,
    dropout: bool = True,
    eval_at_start: bool = False,
) -> LoopResult:
    """Run ``total_steps`` optimizer steps of ``loss_fn`` over ``source``; returns the trained model.

    ``best_by=(key, "min" | "max")``: the evaluation value that ranks checkpoints; the best model so
    far is exported to ``<stage>/best/`` (unless the stage's ``keep_best`` is false) and its step and
    value are returned. ``dropout=False`` trains in :func:`minidistill.models.train_mode` without dropout (MiniLLM).
    ``eval_at_start``: evaluate once before the first step of a fresh (not resumed) run, logged at
    step 0 and no ``best`` candidate. The loop owns the student's precision: batches are drawn
    (MiniLLM samples its rollouts there), the loss runs and evaluation runs under the run's
    autocast, so no stage opens one (the teacher's forwards run under it too, ``teacher.Teacher``)."""
    acc = run.accelerator
    if getattr(acc, "distributed_type", None) == DistributedType.DEEPSPEED and cfg.grad_accum != 1:
        raise UserError(
            f"stage '{cfg.name}': grad_accum {cfg.grad_accum} under DeepSpeed; use grad_accum: 1 and a larger "
            "batch_size (DeepSpeed steps the optimizer inside backward, not after the loop's micro-batches)"
        )
    stage_dir = run.stage_dir(cfg.name)
    ckpt_root = stage_dir / "checkpoints"
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer = acc.prepare(model, optimizer)

    step, best, bad_in_row, skipped = 0, None, 0, 0
    if run.recipe.resume == "auto":

        def report(m: str) -> None:
            if acc.is_main_process:
                console.print(m, style="yellow", markup=False, soft_wrap=True)

        found = ckpt.load_latest(acc, ckpt_root, model, optimizer, scheduler, report=report)
        if found:
            folder, state, source_state = found
            source.load_state_dict(source_state)
            step, best, skipped = state["step"], state.get("best"), state.get("skipped_steps", 0)
            console.print(f"resumed stage '{cfg.name}' from {folder} (step {step})", markup=False, soft_wrap=True)

    def save(at_step: int) -> Path:
        state = {"step": at_step, "best": best, "skipped_steps": skipped}
        return ckpt.save_checkpoint(
            acc, ckpt_root, at_step, model, optimizer, scheduler, source.state_dict(), state, cfg.keep_last
        )

    def run_eval(at_step: int, candidate: bool = True) -> None:
        nonlocal best
        if evaluate is None:
            return
        model.eval()
        with torch.no_grad(), acc.autocast():
            values = evaluate(acc.unwrap_model(model))
        train_mode(model, dropout)
        run.log(cfg.name, at_step, {f"valid/{k}": v for k, v in values.items() if not isinstance(v, (list, dict))})
        if acc.is_main_process:
            console.print(
                f"[cyan]{cfg.name} step {at_step} valid: {fmt({k: v for k, v in values.items() if not isinstance(v, (list, dict))})}[/]"
            )
        if candidate and best_by is not None and best_by[0] in values:
            key, mode = best_by
            v = float(values[key])
            if best is None or (v < best["value"] if mode == "min" else v > best["value"]):
                best = {"key": key, "value": v, "step": at_step}
                if getattr(cfg, "keep_best", True):
                    run.export(acc.unwrap_model(model), stage_dir / "best")

    if eval_at_start and step == 0:
        run_eval(0, candidate=False)
    train_mode(model, dropout)
    bar = tqdm(total=total_steps, initial=step, desc=cfg.name, disable=not acc.is_main_process, dynamic_ncols=True)
    stopped, where = False, None
    with GracefulStop() as stop, contextlib.closing(bar):  # the bar ends its line even on an error
        while step < total_steps:
            t0 = time.perf_counter()
            with acc.autocast():  # MiniLLM samples and scores its rollouts while drawing a batch
                micro = [source.next_batch() for _ in range(cfg.grad_accum)]
            counts = [_term_counts(b) for b in micro]
            names = list(counts[0])
            if any(list(c) != names for c in counts):
                raise ValueError(f"stage '{cfg.name}': micro-batches of one step name different loss terms: {counts}")
            local = torch.tensor([sum(float(c[k]) for c in counts) for k in names], device=acc.device)
            global_counts = [float(x) for x in acc.reduce(local, "sum")]
            scales = [acc.num_processes / max(n, 1.0) for n in global_counts]
            term_sums, sums = [0.0] * len(names), {}
            for i, batch in enumerate(micro):
                sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(model)
                with sync, acc.autocast():
                    loss, metrics = loss_fn(model, batch, step)
                    terms = loss if isinstance(loss, dict) else {"loss": loss}
                    if list(terms) != names:
                        raise ValueError(
                            f"stage '{cfg.name}': the loss returned terms {list(terms)}, the batch counts {names}"
                        )
                    objective = None
                    for k, scale in zip(names, scales):
                        objective = terms[k] * scale if objective is None else objective + terms[k] * scale
                    acc.backward(objective)
                for j, k in enumerate(names):
                    term_sums[j] += float(terms[k].detach())
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            total_loss = sum(term_sums)
            grad_norm = None
            if cfg.grad_clip is not None and cfg.grad_clip > 0:
                norm = acc.clip_grad_norm_(
                    model.parameters(), cfg.grad_clip
                )  # None under DeepSpeed before its first step
                grad_norm = None if norm is None else float(norm)
            finite = math.isfinite(total_loss) and (grad_norm is None or math.isfinite(grad_norm))
            if finite:
                optimizer.step()
                bad_in_row = 0
            else:
                skipped += 1
                bad_in_row += 1
                msg = f"stage '{cfg.name}' step {step + 1}: non-finite loss or gradient (loss {total_loss}, grad norm {grad_norm})"
                if cfg.nan_policy == "stop" or bad_in_row >= cfg.max_bad_steps:
                    raise UserError(
                        msg + f"; stopping ({bad_in_row} bad step(s) in a row, nan_policy={cfg.nan_policy})"
                    )
                console.print(f"[yellow]{msg}; step skipped[/]")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            values = {
                "loss": sum(
                    float(x) / max(n, 1.0)
                    for x, n in zip(acc.reduce(torch.tensor(term_sums, device=acc.device), "sum"), global_counts)
                ),
                "lr": scheduler.get_last_lr()[0],
                "tokens": global_counts[0],
                "tokens_per_s": global_counts[0] / dt,
                "step_time_s": dt,
                "skipped_steps": skipped,
            }
            if grad_norm is not None:
                values["grad_norm"] = grad_norm
            values.update(mean_over_processes(acc, {k: v / len(micro) for k, v in sums.items()}))
            if step % cfg.log_every == 0 or step == total_steps:
                run.log(cfg.name, step, values)
            bar.update(1)
            bar.set_postfix_str(fmt(values, ["loss"] + [k for k in sums][:3]))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run_eval(step)
            if stop.requested:
                where = save(step)
                bar.close()
                console.print(
                    f"stopped by signal at step {step}; checkpoint: {where}",
                    style="yellow",
                    markup=False,
                    soft_wrap=True,
                )
                stopped = True
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save(step)
    bar.close()
    if not stopped:
        run_eval(step)
    model = acc.unwrap_model(model)
    return LoopResult(model=model, step=step, best=best, stopped=stopped, checkpoint=where if stopped else None)

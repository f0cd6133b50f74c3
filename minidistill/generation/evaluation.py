"""Evaluation helpers: batched sampling, ROUGE-L, and the MiniLLM instruction-following protocol.

Protocol (MiniLLM paper): sample with temperature 1, top_p 1, top_k 0, prompts <= 256 tokens,
no_repeat_ngram_size 6, 5 seeds (10..50) averaged; ROUGE-L F-measure (rouge-score,
use_stemmer=True), max over references, x100.

:func:`generate_ids` is the one sampler for a single model (evaluation, SeqKD teacher data,
``analysis.sample_and_score``), called through :class:`Sampling` and :func:`sample_ids` wherever the
settings travel together; the MiniLLM rollout sampler (``sampler.sample``) stays separate
because it mixes teacher and student at every step and records per-token log-probs, which HF
``generate`` cannot. Both apply temperature/top-k/top-p through ``sampler.process_logits``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from minidistill.data import (
    Example,
    collate_prompts,
    encode_prompt,
    render_prompt,
    special_affixes,
    tokenize_prompts,
)
from minidistill.errors import UserError
from minidistill.generation.sampler import process_logits
from minidistill.models.logits import model_device

PAPER_SEEDS = (10, 20, 30, 40, 50)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _context_size(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a generation: the model's generation-config EOS ids and the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise UserError(f"{getattr(tokenizer, 'name_or_path', '') or 'tokenizer'}: no EOS token to stop generation")
    return sorted(ids)


class _VocabLogits(LogitsProcessor):
    """HF ``generate`` logits processor: ids >= ``vocab`` (head rows beyond the tokenizer) to -inf,
    then temperature, top-k and top-p exactly as :func:`minidistill.generation.sampler.process_logits`.

    The mask must come before the warpers (top-k/top-p over the tokenizer's ids only, the
    normaliser over them only), and HF appends custom processors after its own warpers, so
    ``generate`` is called with neutral sampling settings and this processor does all of it.
    """

    def __init__(self, vocab: int | None, temperature: float, top_k: int, top_p: float):
        self.vocab, self.settings = vocab, (temperature, top_k, top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(B, L) ids so far, (B, V_head) next-token scores -> (B, V_head) processed scores."""
        if self.vocab is not None and self.vocab < scores.shape[-1]:
            scores = scores.clone()
            scores[:, self.vocab :] = -math.inf
        return process_logits(scores, *self.settings).to(scores.dtype)


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="prompt", leave=False, dynamic_ncols=True)


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    no_repeat_ngram_size: int = 0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Sample continuations; returns the new token ids per prompt (up to, not including, EOS), in input order.

    Prompts are sorted by length into left-padded batches; each batch is seeded from ``seed`` and
    its index (the caller's RNG state is left untouched). temperature 0 means greedy decoding.
    ``vocab_size`` (``len(tokenizer)``; the stages pass ``run.vocab_size``) restricts sampling to
    ids below it: head rows beyond the tokenizer get no probability and are never emitted.
    Temperature, top-k and top-p are applied over those ids as the MiniLLM sampler does.
    """
    if batch_size < 1:
        raise UserError(f"batch_size: must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    prefix = special_affixes(tokenizer)[0] if any(isinstance(p, str) for p in prompts) else []
    ids = [encode_prompt(p, tokenizer, prefix) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if not ids:
        return []
    stop = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    ctx = _context_size(model)
    longest = max(len(x) for x in ids)
    if ctx is not None and longest + max_new_tokens > ctx:
        raise UserError(
            f"max_new_tokens: longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {ctx} positions"
        )
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": temperature > 0,
        "pad_token_id": pad_id,
        "eos_token_id": stop,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": no_repeat_ngram_size,
    }
    if temperature > 0:  # HF's own warpers neutral (they would run after the vocabulary mask)
        kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
        warp = (float(temperature), int(top_k), float(top_p))
    else:
        warp = (1.0, 0, 1.0)
    kwargs["logits_processor"] = LogitsProcessorList([_VocabLogits(vocab_size, *warp)])

    device = model_device(model)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    results: list[list[int]] = [[] for _ in ids]
    stop_set = set(stop) | {pad_id}
    was_training = model.training
    model.eval()
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with (
            torch.inference_mode(),
            torch.random.fork_rng(devices=rng_devices),
            _progress_bar(len(ids), progress, desc) as bar,
        ):
            for b, start in enumerate(range(0, len(order), batch_size)):
                idx = order[start : start + batch_size]
                input_ids, attention_mask = collate_prompts([ids[i] for i in idx], pad_id)
                torch.manual_seed((seed * 1_000_003 + b) % (2**63))
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
                new = out[:, input_ids.shape[1] :].tolist()
                for i, toks in zip(idx, new):
                    cut = next((k for k, t in enumerate(toks) if t in stop_set), len(toks))
                    results[i] = toks[:cut]
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return results


@dataclass(frozen=True)
class Sampling:
    """How :func:`generate_ids` samples: every setting but the prompts, the seed and the progress label."""

    max_new_tokens: int
    batch_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 0
    progress: bool = True
    vocab_size: int | None = None


def sample_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    sampling: Sampling,
    seed: int,
    desc: str = "generate",
) -> list[list[int]]:
    """:func:`generate_ids` with the settings of ``sampling``: the new ids per prompt, EOS excluded."""
    return generate_ids(model, tokenizer, prompts, seed=int(seed), desc=desc, **dataclasses.asdict(sampling))


def decode(tokenizer: Any, ids: Sequence[Sequence[int]]) -> list[str]:
    """Generated ids as stripped text, special tokens skipped."""
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    seed: int = 0,
    **settings: Any,
) -> list[str]:
    """Sample continuations and return them as stripped text (special tokens skipped), in input order.

    ``settings``: the fields of :class:`Sampling` (``max_new_tokens`` required)."""
    return decode(tokenizer, sample_ids(model, tokenizer, prompts, Sampling(**settings), seed))


# --------------------------------------------------------------------------------------------
# ROUGE-L
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure x100 (rouge-score, stemmed), max over the references."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("rouge_l: no references")
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in refs)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean of rouge_l over pairs (x100)."""
    if len(predictions) != len(references):
        raise ValueError(f"mean_rouge_l: {len(predictions)} predictions but {len(references)} reference sets")
    if not predictions:
        raise ValueError("mean_rouge_l: no predictions")
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(predictions)


# --------------------------------------------------------------------------------------------
# Instruction-following evaluation
# --------------------------------------------------------------------------------------------


def evaluate_instructions(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    template: str = "alpaca",
    seeds: Sequence[int] = PAPER_SEEDS,
    max_prompt_length: int = 256,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    no_repeat_ngram_size: int = 6,
    long_prompt: str = "drop",
    progress: bool = True,
    keep_ids: bool = False,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Generate for every prompt once per seed and score ROUGE-L against the references.

    Returns rougeL (mean over seeds), rougeL_per_seed, mean_length (generated tokens, EOS excluded),
    mean_length_per_seed, n_examples, the tokenization stats, and ``generations``: one dict per
    (seed, example) with seed, index, source, prompt, references, generation, rougeL, length.
    Long prompts are dropped by default, as the MiniLLM data processing does. ``keep_ids`` adds
    ``prompt_ids`` and ``generation_ids`` (new tokens, EOS excluded) to every generation record,
    for analyses that score the samples token by token. ``vocab_size``: see :func:`generate_ids`.
    """
    if not seeds:
        raise UserError("seeds: give at least one seed")
    ids, refs, stats = tokenize_prompts(
        examples, tokenizer, template=template, max_prompt_length=max_prompt_length, long_prompt=long_prompt
    )
    prompt_texts = [render_prompt(examples[i], template, tokenizer) for i in stats.kept_indices]
    sampling = Sampling(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        no_repeat_ngram_size=no_repeat_ngram_size,
        progress=progress,
        vocab_size=vocab_size,
    )
    per_seed: dict[int, float] = {}
    length_per_seed: dict[int, float] = {}
    generations: list[dict[str, Any]] = []
    for seed in seeds:
        new_ids = sample_ids(model, tokenizer, ids, sampling, seed, desc=f"seed {seed}")
        texts = decode(tokenizer, new_ids)
        scores = [rouge_l(t, r) for t, r in zip(texts, refs)]
        per_seed[int(seed)] = sum(scores) / len(scores)
        length_per_seed[int(seed)] = sum(len(x) for x in new_ids) / len(new_ids)
        for k, (text, score, toks) in enumerate(zip(texts, scores, new_ids)):
            i = stats.kept_indices[k]
            prompt_ids = ids[k] if keep_ids else None
            generations.append(
                generation_record(examples[i], i, prompt_texts[k], refs[k], seed, text, score, toks, prompt_ids)
            )
    rouge = sum(per_seed.values()) / len(per_seed)
    return {
        "rougeL": rouge,
        "rougeL_per_seed": per_seed,
        "rougeL_std_over_seeds": _std(list(per_seed.values())),
        "mean_length": sum(length_per_seed.values()) / len(length_per_seed),
        "mean_length_per_seed": length_per_seed,
        "n_examples": stats.n_kept,
        "n_dropped_long_prompt": stats.n_dropped_long_prompt,
        "n_truncated_prompt": stats.n_truncated_prompt,
        "generations": generations,
    }


def generation_record(
    example: Example,
    index: int,
    prompt: str,
    references: Any,
    seed: int,
    generation: str,
    score: float,
    ids: Sequence[int],
    prompt_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One line of a generations file: the example's index, source, prompt and references, the seed, the
    generated text, its ROUGE-L and length in tokens; ``prompt_ids`` given: also the prompt and
    generated ids (EOS excluded), for analyses that score the samples token by token."""
    record = {
        "seed": int(seed),
        "index": index,
        "source": example.source,
        "prompt": prompt,
        "references": references,
        "generation": generation,
        "rougeL": score,
        "length": len(ids),
    }
    if prompt_ids is not None:
        record.update(prompt_ids=list(prompt_ids), generation_ids=list(ids))
    return record


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def parse_int_list(text: str, flag: str, example: str, minimum: int | None = None) -> list[int]:
    """Parse a comma-separated list of integers from a command-line flag (UserError naming the flag)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers like {example}, got '{text}'") from None
    if not values:
        raise UserError(f"{flag}: give at least one value")
    if minimum is not None and min(values) < minimum:
        raise UserError(f"{flag}: values must be at least {minimum}, got {text}")
    return values

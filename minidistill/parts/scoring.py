"""Score a model against its teacher on instruction prompts: the one scorer of the evaluate stage
(``minidistill/stages/evaluate.py``), ``eval/analyze.py`` and ``eval/compare.py``.

:func:`score_model` samples one response per prompt and seed (:func:`minidistill.generation.evaluation.sample_ids`,
the settings in one :class:`minidistill.generation.evaluation.Sampling`), scores ROUGE-L against the references,
and measures per-token KL to the teacher: reverse KL(q||p) at every step of the model's own samples
and forward KL(p||q) at every step of the teacher's samples (:func:`minidistill.reporting.analysis.score_steps`:
exact over the first ``vocab_size`` logits, one batched pass per seed). :func:`gold_kl` adds both KLs
teacher-forced on the gold responses. The pure parts (:func:`pooled_kl`, :func:`eos_rate`,
:func:`mean_length`, :func:`mean_by_seed`) are unit-tested against hand-computed values.

The teacher is a plain argument (a causal LM; in a run ``run.teacher.model``) with its vocabulary size, so any
caller that holds one can score against it. ``teacher=None`` scores without KLs (ROUGE-L, length,
EOS rate only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from minidistill.data import eos_id, tokenize_sft
from minidistill.generation.evaluation import Sampling, decode, rouge_l
from minidistill.reporting.analysis import Samples, draw_samples, response_kl, score_steps

__all__ = [
    "Score",
    "eos_rate",
    "gold_kl",
    "mean_by_seed",
    "mean_length",
    "pooled_kl",
    "score_model",
    "select",
]


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def pooled_kl(per_step: Sequence[Sequence[float]]) -> float:
    """Mean per-token KL over every scored step of every sequence (0.0 when none was scored)."""
    return sum(sum(x) for x in per_step) / max(sum(len(x) for x in per_step), 1)


def eos_rate(ended: Sequence[bool]) -> float:
    """Share of responses that stopped (EOS) before the token limit; 0.0 for none."""
    return sum(ended) / max(len(ended), 1)


def mean_length(responses: Sequence[Sequence[int]]) -> float:
    """Mean response length in tokens (EOS excluded); 0.0 for none."""
    return sum(len(r) for r in responses) / max(len(responses), 1)


def mean_by_seed(values: Sequence[float], seeds: Sequence[int]) -> dict[int, float]:
    """{seed: mean of the values of that seed}, seeds in order of first appearance."""
    if len(values) != len(seeds):
        raise ValueError(f"mean_by_seed: {len(values)} values but {len(seeds)} seeds")
    groups: dict[int, list[float]] = {}
    for v, s in zip(values, seeds):
        groups.setdefault(int(s), []).append(v)
    return {s: sum(v) / len(v) for s, v in groups.items()}


def select(samples: Samples, keep: Sequence[int]) -> Samples:
    """The samples at positions ``keep``, in that order."""
    return Samples(**{f.name: [getattr(samples, f.name)[k] for k in keep] for f in dataclasses.fields(Samples)})


# --------------------------------------------------------------------------------------------
# The scorer
# --------------------------------------------------------------------------------------------


@dataclass
class Score:
    """One model scored against the teacher.

    ``samples``: its own samples (every seed, seed-major; ``rkl``/``fkl`` filled on the KL seeds);
    ``texts``/``rouge``: each sample decoded and its ROUGE-L (None without references);
    ``teacher_samples``: the teacher's samples with this model's KL at every step (None when none
    were given); ``kl``: whether KLs were measured (a teacher was given).
    """

    samples: Samples
    texts: list[str]
    rouge: list[float] | None
    teacher_samples: Samples | None
    kl: bool

    @property
    def reverse_kl(self) -> float | None:
        """KL(q||p) per token on the model's own samples (nats), pooled over the scored steps."""
        return pooled_kl(self.samples.rkl) if self.kl else None

    @property
    def forward_kl(self) -> float | None:
        """KL(p||q) per token on the teacher's samples (nats), pooled over the scored steps."""
        return pooled_kl(self.teacher_samples.fkl) if self.kl and self.teacher_samples is not None else None

    @property
    def rouge_l(self) -> float | None:
        """ROUGE-L x100, mean over every sample (every prompt and seed)."""
        return sum(self.rouge) / len(self.rouge) if self.rouge else None

    @property
    def eos_rate(self) -> float:
        return eos_rate(self.samples.ended)

    @property
    def mean_length(self) -> float:
        return mean_length(self.samples.responses)


def score_model(
    model: Any,
    teacher: Any | None,
    vocab_size: int | None,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    sampling: Sampling,
    seeds: Sequence[int],
    references: Sequence[str | Sequence[str]] | None = None,
    teacher_samples: Samples | None = None,
    teacher_prompts: Sequence[Sequence[int]] | None = None,
    kl_seeds: Sequence[int] | None = None,
) -> Score:
    """Sample ``model`` on ``prompts`` (token ids) once per seed and score it against ``teacher``.

    ``vocab_size`` (the teacher's: ``len(tokenizer)``, ``run.vocab_size``) bounds sampling and the
    KLs. ``references[i]``: the reference(s) of prompt i, for ROUGE-L. ``teacher_samples``: the
    teacher's samples (:func:`score_model` of the teacher, or built by the caller), each indexing
    ``teacher_prompts`` (default ``prompts``); the model's forward KL is measured on them.
    ``kl_seeds``: the seeds whose own samples get KLs (default: all). ``model is teacher``: the KLs
    are 0 at every step, without forward passes.
    """
    sampling = dataclasses.replace(sampling, vocab_size=vocab_size)
    own = draw_samples(model, tokenizer, prompts, sampling, seeds)
    texts = decode(tokenizer, own.responses)
    rouge = None if references is None else [rouge_l(t, references[i]) for t, i in zip(texts, own.prompt_index)]
    scored_teacher = None
    if teacher is not None:
        eos = eos_id(tokenizer)
        kw = dict(
            eos=eos,
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            batch_size=sampling.batch_size,
            vocab_size=vocab_size,
        )
        score_steps(model, teacher, prompts, own, seeds=kl_seeds, **kw)
        if teacher_samples is not None:
            scored_teacher = select(teacher_samples, range(len(teacher_samples.responses)))  # a copy
            t_prompts = prompts if teacher_prompts is None else teacher_prompts
            score_steps(model, teacher, t_prompts, scored_teacher, **kw)
    return Score(own, texts, rouge, scored_teacher, teacher is not None)


def gold_kl(
    model: Any,
    teacher: Any,
    vocab_size: int | None,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    template: str,
    max_prompt_length: int,
    max_length: int,
    batch_size: int,
    long_prompt: str = "drop",
) -> tuple[dict[str, Any], list[list[int]], list[list[int]]]:
    """Reverse and forward KL teacher-forced on the gold responses (+ EOS) of ``examples``, as
    :func:`minidistill.reporting.analysis.response_kl` returns them (without ``per_sequence``), and the
    (prompt ids, response ids) pairs they were measured on."""
    rows, _ = tokenize_sft(
        examples,
        tokenizer,
        template=template,
        max_prompt_length=max_prompt_length,
        max_length=max_length,
        long_prompt=long_prompt,
    )
    prompts = [r["input_ids"][: r["prompt_length"]] for r in rows]
    responses = [r["input_ids"][r["prompt_length"] :] for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    res = response_kl(model, teacher, prompts, responses, pad_id=pad, batch_size=batch_size, vocab_size=vocab_size)
    res.pop("per_sequence")
    return res, prompts, responses

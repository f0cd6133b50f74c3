"""Analysis metrics from the MiniLLM paper: token-level KL to the teacher, Dist-n, exposure bias
(ExAccErr), calibration (ECE).

Notation: teacher p, model (student) q, prompt x, response y = y_1..y_T. "Step t" is the
prediction of y_t from the prefix (x, y_<t); a response that ended with EOS has T+1 steps (the
EOS prediction counts, as in training), one cut at ``max_new_tokens`` has T.

Pure helpers (lists / tensors in, numbers out; pinned to hand-computed values in
tests/unit/test_analysis.py): :func:`distinct_n`, :func:`ece_from_confidences`,
:func:`reliability_bins`, :func:`exaccerr_curve`, :func:`kl_per_position`.
Model-level wrappers (batched, masked, ``torch.no_grad``): :func:`token_kl` (one padded batch),
:func:`response_kl` (lists of prompts / responses), :func:`calibration_ece`,
:func:`sample_and_score` (:func:`draw_samples` then :func:`score_steps`), :func:`exposure_bias`.
The scorer that puts these together for a model against its teacher is :mod:`minidistill.scoring`.

Padding convention (as in the MiniLLM stage): prompts LEFT-padded, responses RIGHT-padded, one
forward pass over [prompt | response] with position ids from the attention mask, so a row's
values do not depend on how much padding its batch carries. KL values are in nats per token,
exact over the vocabulary (the first ``vocab_size`` logits: heads padded beyond the tokenizer
are ignored), computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from minidistill.functional.losses import forward_kl, reverse_kl
from minidistill.models.logits import response_logits

__all__ = [
    "Samples",
    "calibration_ece",
    "collate_pairs",
    "distinct_n",
    "ece_from_confidences",
    "finite_or_none",
    "exaccerr_curve",
    "exposure_bias",
    "kl_per_position",
    "reliability_bins",
    "draw_samples",
    "exposure_bias_from",
    "response_kl",
    "sample_and_score",
    "score_steps",
    "summarize_samples",
    "token_kl",
    "token_kl_per_position",
    "with_eos",
]


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def _tokens(item: str | Sequence[Any]) -> list:
    return item.split() if isinstance(item, str) else list(item)


def distinct_n(texts: Sequence[str | Sequence[Any]], n: int = 4, *, average: str = "corpus") -> float:
    """Dist-n: distinct n-grams / total n-grams, a fraction in [0, 1] (the paper prints x100).

    A string is split on whitespace (``str.split()``: case and punctuation kept, so "Cat" and
    "cat." are different tokens); any other item is taken as an already tokenized sequence (e.g.
    token ids). A text shorter than n tokens has no n-grams.

    ``average="corpus"`` (default): the n-grams of all texts pooled, |set of n-grams| / #n-grams.
    ``average="per_text"``: the ratio computed per text and averaged over the texts that have
    at least one n-gram. Returns 0.0 when there is no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be at least 1, got {n}")
    if average not in ("corpus", "per_text"):
        raise ValueError(f"distinct_n: average must be 'corpus' or 'per_text', got {average!r}")
    seen: set[tuple] = set()
    total = 0
    ratios: list[float] = []
    for item in texts:
        toks = _tokens(item)
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        if not grams:
            continue
        total += len(grams)
        seen.update(grams)
        ratios.append(len(set(grams)) / len(grams))
    if average == "per_text":
        return sum(ratios) / len(ratios) if ratios else 0.0
    return len(seen) / total if total else 0.0


def _as_1d(x: Any, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(x).detach().reshape(-1).to(device="cpu", dtype=dtype)


def reliability_bins(confidences: Any, correct: Any, n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-width confidence bins over [0, 1]: bin b is (b/n, (b+1)/n], the first also holds 0.

    Returns one dict per bin: lo, hi, count, accuracy (fraction correct) and confidence (mean
    confidence); accuracy/confidence are None for an empty bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins: must be at least 1, got {n_bins}")
    conf = _as_1d(confidences)
    corr = _as_1d(correct)
    if conf.shape != corr.shape:
        raise ValueError(f"confidences and correct differ in size: {conf.numel()} vs {corr.numel()}")
    if conf.numel() and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    # 1e-6 slack: a float32 0.1 (= 0.10000000149) still belongs to (0, 0.1]
    idx = (torch.ceil(conf * n_bins - 1e-6) - 1).clamp(0, n_bins - 1).long()
    bins = []
    for b in range(n_bins):
        sel = idx == b
        k = int(sel.sum())
        bins.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "count": k,
                "accuracy": float(corr[sel].mean()) if k else None,
                "confidence": float(conf[sel].mean()) if k else None,
            }
        )
    return bins


def ece_from_confidences(confidences: Any, correct: Any, n_bins: int = 10) -> float:
    """Expected calibration error (Guo et al. 2017) with equal-width bins (see :func:`reliability_bins`):

        ECE = sum_b (|B_b| / N) * |acc(B_b) - conf(B_b)|

    ``confidences``: top-1 probabilities in [0, 1]; ``correct``: 1/True where the top-1
    prediction was right. A fraction in [0, 1]; 0.0 for no predictions.
    """
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return 0.0
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])


def exaccerr_curve(
    student_errors: Sequence[Sequence[float]], teacher_errors: Sequence[Sequence[float]], lengths: Sequence[int]
) -> dict[str, Any]:
    """ExAccErr(l) (MiniLLM paper, "Exposure bias" analysis; Arora et al. 2022) from per-step errors.

    ``student_errors[i][t-1]`` = e_t = KL(p || q) at step t of the i-th sequence the MODEL
    generated (free run: prefix y_<t ~ q); ``teacher_errors[j][t-1]`` the same for the j-th
    sequence the TEACHER generated (oracle prefix y_<t ~ p). With the per-sample averages

        R(l)      = mean_i sum_{t<=l} student_errors[i][t-1]   (accumulated regret, free run)
        l*eps(l)  = mean_j sum_{t<=l} teacher_errors[j][t-1]   (teacher-forced/oracle error)
        ExAccErr(l) = (R(l) - l*eps(l)) / (l*eps(l)) * 100 %

    A sequence that ended before step l adds nothing after its end (error 0 past EOS, as the
    official MiniLLM code masks finished sequences). Returns lengths, R, l_eps, eps (= l_eps /
    l), exaccerr (None where l*eps(l) = 0) and the fractions of student/teacher sequences still
    running at step l (``student_running``, ``teacher_running``: length >= l).
    """
    if not student_errors or not teacher_errors:
        raise ValueError("exaccerr_curve: need at least one student and one teacher sequence")
    lengths = [int(x) for x in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"exaccerr_curve: lengths must be positive integers, got {lengths}")

    def accumulated(errors: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
        sums, running = [], []
        for length in lengths:
            sums.append(sum(float(sum(e[:length])) for e in errors) / len(errors))
            running.append(sum(len(e) >= length for e in errors) / len(errors))
        return sums, running

    R, s_run = accumulated(student_errors)
    l_eps, t_run = accumulated(teacher_errors)
    exacc = [100.0 * (r - le) / le if le > 0 else None for r, le in zip(R, l_eps)]
    return {
        "lengths": lengths,
        "R": R,
        "l_eps": l_eps,
        "eps": [le / length for le, length in zip(l_eps, lengths)],
        "exaccerr": exacc,
        "student_running": s_run,
        "teacher_running": t_run,
        "n_student_sequences": len(student_errors),
        "n_teacher_sequences": len(teacher_errors),
    }


def kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reverse KL(q||p), forward KL(p||q)) per position, exact over the last dim, float32. (..., V) -> (...)"""
    lq = torch.log_softmax(student_logits.float(), dim=-1)
    lp = torch.log_softmax(teacher_logits.float(), dim=-1)
    shape = lq.shape[:-1]
    lq, lp = lq.reshape(-1, lq.shape[-1]), lp.reshape(-1, lp.shape[-1])
    return reverse_kl(lq, lp).reshape(shape), forward_kl(lq, lp).reshape(shape)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def collate_pairs(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt_ids, prompt_mask) left-padded and (response_ids, response_mask) right-padded."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(
            f"collate_pairs: need matching non-empty lists, got {len(prompts)} prompts and {len(responses)} responses"
        )
    P = max(len(p) for p in prompts)
    T = max(1, max(len(r) for r in responses))
    n = len(prompts)
    pi = torch.full((n, P), pad_id, dtype=torch.long)
    pm = torch.zeros((n, P), dtype=torch.long)
    ri = torch.full((n, T), pad_id, dtype=torch.long)
    rm = torch.zeros((n, T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if p:
            pi[i, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            pm[i, P - len(p) :] = 1
        if r:
            ri[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            rm[i, : len(r)] = 1
    return pi, pm, ri, rm


def _vocab(a: torch.Tensor, b: torch.Tensor | None, vocab_size: int | None) -> int:
    v = a.shape[-1] if b is None else min(a.shape[-1], b.shape[-1])
    return v if vocab_size is None else min(v, int(vocab_size))


def _batches(order: list[int], batch_size: int):
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


def _length_order(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[int]:
    return sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(responses[i])))


# --------------------------------------------------------------------------------------------
# Token-level KL to the teacher
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def token_kl_per_position(
    model: Any,
    teacher: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position (reverse KL(q||p), forward KL(p||q)), each (B, T) float32 on CPU, 0 on padding.

    Teacher-forced on the given responses: the value at t is the exact KL between the two
    next-token distributions given (x, y_<t); it does not depend on y_t itself.
    """
    s_logits = response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask)
    t_logits = response_logits(teacher, prompt_ids, prompt_mask, response_ids, response_mask)
    V = _vocab(s_logits, t_logits, vocab_size)
    B, T = response_ids.shape
    rkl = torch.zeros((B, T), dtype=torch.float32)
    fkl = torch.zeros((B, T), dtype=torch.float32)
    valid = response_mask.bool().cpu()
    for b in range(B):  # one row at a time: a (T, V) float32 pair, never (B, T, V) of them
        sel = valid[b].nonzero().squeeze(-1)
        if sel.numel() == 0:
            continue
        dev_sel = sel.to(s_logits.device)
        r, f = kl_per_position(
            s_logits[b, dev_sel, :V], t_logits[b, dev_sel.to(t_logits.device), :V].to(s_logits.device)
        )
        rkl[b, sel] = r.cpu()
        fkl[b, sel] = f.cpu()
    return rkl, fkl


def token_kl(
    model: Any,
    teacher: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Mean per-token reverse KL(q||p) and forward KL(p||q) over the valid response tokens of one batch.

    Prompts left-padded, responses right-padded (``response_mask`` 1 on valid tokens, EOS
    included when it is part of the response). Returns reverse_kl, forward_kl (nats/token,
    exact over the vocabulary, teacher-forced on the given responses) and n_tokens.
    """
    rkl, fkl = token_kl_per_position(
        model, teacher, prompt_ids, prompt_mask, response_ids, response_mask, vocab_size=vocab_size
    )
    n = int(response_mask.sum())
    return {"reverse_kl": float(rkl.sum()) / max(n, 1), "forward_kl": float(fkl.sum()) / max(n, 1), "n_tokens": n}


def response_kl(
    model: Any,
    teacher: Any,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 4,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """:func:`token_kl` over lists of prompt / response ids (batched by length), pooled over all tokens.

    Also returns the per-sequence step values (``per_sequence``: list of (rkl list, fkl list)).
    """
    order = _length_order(prompts, responses)
    per_seq: list[tuple[list[float], list[float]]] = [([], []) for _ in prompts]
    for idx in _batches(order, batch_size):
        batch = collate_pairs([prompts[i] for i in idx], [responses[i] for i in idx], pad_id)
        rkl, fkl = token_kl_per_position(model, teacher, *batch, vocab_size=vocab_size)
        for k, i in enumerate(idx):
            n = len(responses[i])
            per_seq[i] = (rkl[k, :n].tolist(), fkl[k, :n].tolist())
    n_tok = sum(len(r) for r, _ in per_seq)
    return {
        "reverse_kl": sum(sum(r) for r, _ in per_seq) / max(n_tok, 1),
        "forward_kl": sum(sum(f) for _, f in per_seq) / max(n_tok, 1),
        "n_tokens": n_tok,
        "per_sequence": per_seq,
    }


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def calibration_ece(
    model: Any,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    n_bins: int = 10,
    batch_size: int = 4,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Token-level calibration of the model's top-1 next-token predictions on reference responses.

    Teacher-forced on (prompt, reference response [+ EOS]): at every response token the
    confidence is max_v q(v | x, y_<t) and the prediction is correct when argmax_v q = y_t.
    Returns ece (equal-width bins, :func:`ece_from_confidences`), accuracy, mean_confidence
    (fractions in [0, 1]), n_tokens, n_bins and the reliability ``bins``.

    (The MiniLLM paper reports ECE on SST-2 / BoolQ answer tokens; this is the same statistic
    over every token of instruction responses, which needs no classification set.)
    """
    order = _length_order(prompts, responses)
    confs: list[torch.Tensor] = []
    hits: list[torch.Tensor] = []
    for idx in _batches(order, batch_size):
        pi, pm, ri, rm = collate_pairs([prompts[i] for i in idx], [responses[i] for i in idx], pad_id)
        logits = response_logits(model, pi, pm, ri, rm)
        V = _vocab(logits, None, vocab_size)
        valid = rm.bool()
        for b in range(len(idx)):
            sel = valid[b].nonzero().squeeze(-1)
            if sel.numel() == 0:
                continue
            probs = torch.softmax(logits[b, sel.to(logits.device), :V].float(), dim=-1)
            conf, pred = probs.max(-1)
            confs.append(conf.cpu())
            hits.append((pred.cpu() == ri[b, sel]).float())
    conf = torch.cat(confs) if confs else torch.zeros(0)
    corr = torch.cat(hits) if hits else torch.zeros(0)
    n = int(conf.numel())
    return {
        "ece": ece_from_confidences(conf, corr, n_bins),
        "accuracy": float(corr.mean()) if n else 0.0,
        "mean_confidence": float(conf.mean()) if n else 0.0,
        "n_tokens": n,
        "n_bins": n_bins,
        "bins": reliability_bins(conf, corr, n_bins),
    }


# --------------------------------------------------------------------------------------------
# Sampling + exposure bias
# --------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Free-running samples of one generator, scored against the teacher step by step.

    ``prompt_index[k]``/``seed[k]``: which prompt and seed sample k came from; ``responses[k]``
    the generated ids (EOS excluded); ``ended[k]`` True when it stopped on EOS before
    max_new_tokens; ``rkl[k]``/``fkl[k]``: KL(q||p) and KL(p||q) at each step (len(responses[k])
    steps, plus the EOS prediction when it ended).
    """

    prompt_index: list[int] = field(default_factory=list)
    seed: list[int] = field(default_factory=list)
    responses: list[list[int]] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    rkl: list[list[float]] = field(default_factory=list)
    fkl: list[list[float]] = field(default_factory=list)


def with_eos(responses: Sequence[Sequence[int]], ended: Sequence[bool], eos: int) -> list[list[int]]:
    """Sampled responses as they are scored: EOS appended to those that stopped before the limit (the
    EOS prediction counts; the token there is irrelevant to the KL at that step, so EOS stands in for
    whichever stop token was drawn)."""
    return [list(r) + [eos] if e else list(r) for r, e in zip(responses, ended)]


def _sampling(settings: dict[str, Any]):
    """The :class:`minidistill.generation.evaluation.Sampling` of the keyword settings, with this module's defaults."""
    from minidistill.generation.evaluation import Sampling

    return Sampling(**{"max_new_tokens": 256, "batch_size": 4, "progress": False, **settings})


def draw_samples(
    generator: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], sampling: Any, seeds: Sequence[int]
) -> Samples:
    """One response per prompt and seed from ``generator`` (seed-major), KLs not yet scored
    (``rkl``/``fkl`` empty lists): see :func:`score_steps`. ``sampling``: an
    :class:`minidistill.generation.evaluation.Sampling`."""
    from minidistill.generation.evaluation import sample_ids

    out = Samples()
    for seed in seeds:
        new = sample_ids(generator, tokenizer, [list(p) for p in prompts], sampling, seed, desc=f"sample seed {seed}")
        for i, r in enumerate(new):
            out.prompt_index.append(i)
            out.seed.append(int(seed))
            out.responses.append(list(r))
            out.ended.append(len(r) < sampling.max_new_tokens)
            out.rkl.append([])
            out.fkl.append([])
    return out


def score_steps(
    model: Any,
    teacher: Any,
    prompts: Sequence[Sequence[int]],
    samples: Samples,
    *,
    eos: int,
    pad_id: int,
    batch_size: int,
    vocab_size: int | None = None,
    seeds: Sequence[int] | None = None,
) -> Samples:
    """Fill ``samples.rkl``/``fkl`` (in place; returned) with KL(q||p) and KL(p||q) at every step of
    the samples of ``seeds`` (default: all), teacher-forced with :func:`response_kl`, one batched pass
    per seed; ``prompts[samples.prompt_index[k]]`` is sample k's prompt. The EOS prediction of a
    sample that stopped counts (:func:`with_eos`). ``model is teacher``: 0 at every step, no passes."""
    scored = with_eos(samples.responses, samples.ended, eos)
    wanted = list(dict.fromkeys(samples.seed)) if seeds is None else [int(s) for s in seeds]
    for seed in wanted:
        group = [k for k, s in enumerate(samples.seed) if s == seed]
        per_seq: list[tuple[list[float], list[float]]] = []
        if model is teacher:  # KL of the teacher to itself: 0 at every step, no forward passes
            per_seq = [([0.0] * len(scored[k]), [0.0] * len(scored[k])) for k in group]
        elif group:
            per_seq = response_kl(
                model,
                teacher,
                [prompts[samples.prompt_index[k]] for k in group],
                [scored[k] for k in group],
                pad_id=pad_id,
                batch_size=batch_size,
                vocab_size=vocab_size,
            )["per_sequence"]
        for k, (rk, fk) in zip(group, per_seq):
            samples.rkl[k], samples.fkl[k] = rk, fk
    return samples


def sample_and_score(
    generator: Any,
    model: Any,
    teacher: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    seeds: Sequence[int] = (0,),
    sampling: Any = None,
    **settings: Any,
) -> Samples:
    """Sample one response per prompt and seed from ``generator`` (the model or the teacher) with
    :func:`minidistill.generation.evaluation.sample_ids`, then score every step with :func:`score_steps`.
    ``sampling``: an :class:`minidistill.generation.evaluation.Sampling`, or its fields as keywords (defaults
    here: max_new_tokens 256, batch_size 4, no progress bar). ``vocab_size`` (``len(tokenizer)``)
    bounds both: no id >= it is sampled, and the KLs are over the first ``vocab_size`` logits.
    """
    from minidistill.data import eos_id

    sampling = sampling if sampling is not None else _sampling(settings)
    eos = eos_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = draw_samples(generator, tokenizer, prompts, sampling, seeds)
    return score_steps(
        model,
        teacher,
        prompts,
        out,
        eos=eos,
        pad_id=pad_id,
        batch_size=sampling.batch_size,
        vocab_size=sampling.vocab_size,
    )


def summarize_samples(samples: Samples) -> dict[str, Any]:
    """Pooled per-token reverse/forward KL over all scored steps, mean length (tokens, EOS excluded), EOS rate."""
    n_tok = sum(len(x) for x in samples.rkl)
    n = len(samples.responses)
    return {
        "reverse_kl": sum(sum(x) for x in samples.rkl) / max(n_tok, 1),
        "forward_kl": sum(sum(x) for x in samples.fkl) / max(n_tok, 1),
        "n_tokens": n_tok,
        "n_samples": n,
        "mean_length": sum(len(r) for r in samples.responses) / max(n, 1),
        "eos_rate": sum(samples.ended) / max(n, 1),
    }


def exposure_bias(
    model: Any,
    teacher: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    seeds: Sequence[int] = (0,),
    max_new_tokens: int | None = None,
    return_samples: bool = False,
    **settings: Any,
):
    """ExAccErr(l) of ``model`` against ``teacher`` for each generation length l in ``lengths``.

    Definition (MiniLLM, Gu et al. 2023/ICLR 2024, Sec. "Exposure bias", following Arora et al.
    2022, "Why Exposure Bias Matters", ACL Findings):

        R(l)     = sum_{t=1}^{l} E_{y_<t ~ q(.|x)} E_{y_t ~ p(.|y_<t,x)} [log p(y_t|y_<t,x) - log q(y_t|y_<t,x)]
        l*eps(l) = sum_{t=1}^{l} E_{y_<t ~ p(.|x)} E_{y_t ~ p(.|y_<t,x)} [log p(y_t|y_<t,x) - log q(y_t|y_<t,x)]
        ExAccErr(l) = (R(l) - l*eps(l)) / (l*eps(l)) * 100 %

    i.e. the per-step error is the forward KL(p || q) of the next-token distributions; R sums it
    along the model's own free-running generations (accumulated regret), l*eps(l) along the
    teacher's (oracle-context) generations. ExAccErr is the percentage of the error beyond what
    the model makes on oracle prefixes: the part caused by exposure bias. Estimated with one
    sample per prompt and seed from each of q and p (pure sampling: temperature 1, top_p 1,
    top_k 0, no n-gram blocking by default, as the official script's eval), the inner
    expectation over y_t computed exactly over the vocabulary, errors of a sequence counted 0
    after its EOS (official code: evaluate_exposure_bias.py in microsoft/LMOps/minillm masks
    finished positions and cumulates per-position means). See :func:`exaccerr_curve`.
    Two details differ from that script on purpose: step 1 (the prediction of y_1 from the prompt)
    is included, as the sum from t = 1 says (the script starts at y_2), and the EOS prediction of
    a finished sample counts (the script's pad = EOS mask drops it).
    Both generators use the same seeds (common random numbers: while q and p agree the two
    samples coincide), which lowers the variance of R(l) - l*eps(l); each term stays unbiased.

    ``max_new_tokens`` defaults to max(lengths) (truncating a longer sample at l has exactly the
    distribution of a sample limited to l tokens, so a larger value is also correct). Returns
    the :func:`exaccerr_curve` dict plus ``curve`` (the same quantities at every l = 1..max) and
    summaries of both sample sets; with ``return_samples`` also the (student, teacher) Samples.
    """
    lengths = _lengths(lengths)
    max_new = max(lengths) if max_new_tokens is None else max(int(max_new_tokens), max(lengths))
    sampling = _sampling({**settings, "max_new_tokens": max_new})
    student = sample_and_score(model, model, teacher, tokenizer, prompts, seeds=seeds, sampling=sampling)
    teacher_s = sample_and_score(teacher, model, teacher, tokenizer, prompts, seeds=seeds, sampling=sampling)
    result = exposure_bias_from(student, teacher_s, lengths, seeds=seeds, max_new_tokens=max_new)
    if return_samples:
        return result, student, teacher_s
    return result


def _lengths(lengths: Sequence[int]) -> list[int]:
    out = sorted({int(x) for x in lengths})
    if not out or out[0] < 1:
        raise ValueError(f"exposure_bias: lengths must be positive integers, got {out}")
    return out


def exposure_bias_from(
    student: Samples, teacher_s: Samples, lengths: Sequence[int], *, seeds: Sequence[int], max_new_tokens: int
) -> dict[str, Any]:
    """:func:`exposure_bias`'s result from already scored samples: the model's own (``student``) and
    the teacher's (``teacher_s``), both with the model's forward KL at every step."""
    lengths = _lengths(lengths)
    result = exaccerr_curve(student.fkl, teacher_s.fkl, lengths)
    curve = exaccerr_curve(student.fkl, teacher_s.fkl, list(range(1, max(lengths) + 1)))
    result["curve"] = {k: curve[k] for k in ("lengths", "R", "l_eps", "exaccerr")}
    result["student_samples"] = summarize_samples(student)
    result["teacher_samples"] = summarize_samples(teacher_s)
    result["max_new_tokens"] = max_new_tokens
    result["seeds"] = [int(s) for s in seeds]
    return result


def finite_or_none(x: float | None) -> float | None:
    """JSON-safe float: None for None / NaN / inf."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)

"""Teacher-mixed rollout sampler for on-policy distillation (MiniLLM).

Notation: teacher p, student q, mixture p~ = a*p + (1-a)*q with a = ``mix_alpha``
(MiniLLM uses a = 0.2; a = 0 is pure student sampling). Both models step token by token, each
with its own KV cache; at every step both next-token logits go through :func:`process_logits`,
the next token is drawn from p~ and log q, log p~ and log p of that token are recorded.

Function boundary (what any sampler backend must honour, so a vLLM-backed sampler can be a
drop-in replacement with the same signature as :func:`sample`):

- input: LEFT-padded ``prompt_ids``/``prompt_mask`` (B, P) plus the sampling settings;
- output: a :class:`Rollout` on the student's device: RIGHT-padded ``response_ids`` (B, T)
  with ``pad_token_id``, ``response_mask`` whose valid tokens are a prefix of each row (EOS
  included), and float32 ``student_logp`` / ``mix_logp`` / ``teacher_logp`` (B, T) that are 0 at
  padding and computed under the *processed* distributions (same :func:`process_logits`), so
  the trainer can recompute log q with grad and compare.

A vLLM backend would generate with the student (``SamplingParams(temperature=..., top_k=...,
top_p=..., logprobs=0)``, engine argument ``logprobs_mode="processed_logprobs"`` so the returned
log q is that of the processed distribution), right-pad the outputs into a :class:`Rollout`, and
fill ``teacher_logp`` with one teacher-forced pass over prompt+response (logits through
:func:`process_logits`). That covers a = 0, with ``mix_logp = student_logp``; vLLM's top-k/top-p
may differ from HF's in ties and rounding, so such a backend should be checked against this one.
For a > 0 the mixture needs p at every step, which vLLM cannot provide without serving the
teacher in lockstep; such runs fall back to this implementation.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

__all__ = ["Rollout", "process_logits", "sample"]


@dataclass
class Rollout:
    """A batch of sampled responses with per-token log-probs (all (B, ...) tensors, same device)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 = real token
    response_ids: torch.Tensor  # (B, T) right-padded with pad_token_id
    response_mask: torch.Tensor  # (B, T) 1 = valid (a prefix of each row, EOS included)
    student_logp: torch.Tensor  # (B, T) float32 log q(y_t), 0 at padding
    mix_logp: torch.Tensor  # (B, T) float32 log p~(y_t), 0 at padding
    teacher_logp: torch.Tensor  # (B, T) float32 log p(y_t), 0 at padding

    @property
    def batch_size(self) -> int:
        """Number of rows B."""
        return self.prompt_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        """Valid response tokens per row. # (B,)"""
        return self.response_mask.sum(-1)

    def to(self, device: torch.device | str) -> Rollout:
        """Return a copy with every tensor on ``device``."""
        return Rollout(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, rows: slice | Sequence[int] | torch.Tensor) -> Rollout:
        """Return the rows ``rows`` (a slice, index list/tensor or bool mask), e.g. a minibatch.

        The response columns are trimmed to the longest selected response.
        """
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, device=self.prompt_ids.device)
        out = {f.name: getattr(self, f.name)[rows] for f in fields(self)}
        t = int(out["response_mask"].sum(-1).max().item()) if out["response_mask"].numel() else 0
        for name in ("response_ids", "response_mask", "student_logp", "mix_logp", "teacher_logp"):
            out[name] = out[name][:, :t]
        return Rollout(**out)

    def split(self, minibatch_size: int) -> list[Rollout]:
        """Consecutive minibatches of ``minibatch_size`` rows (the last may be smaller)."""
        return [
            self.select(slice(i, i + minibatch_size))
            for i in range(0, self.batch_size, minibatch_size)
        ]


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order of HF ``generate``) on float32 logits.

    Works on (..., V) with or without grad (filtered entries become -inf; use ``log_softmax``
    on the result). Identity (apart from the float32 cast) when temperature 1, top_k 0, top_p 1.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    shape = logits.shape
    x = logits.float().reshape(-1, shape[-1])  # (N, V); TopP scatters along dim 1
    if temperature != 1.0:
        x = TemperatureLogitsWarper(float(temperature))(None, x)
    if top_k > 0:
        x = TopKLogitsWarper(int(top_k))(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(float(top_p))(None, x)
    return x.reshape(shape)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (all HF causal LMs in v5 do)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DDP/accelerate wrapper (``.module``), else the model itself."""
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    cache: DynamicCache,
    last_only: bool,
) -> torch.Tensor:
    """One cached forward; returns the last position's raw logits. # (B, V)"""
    dev = _device_of(model)
    kw = {"logits_to_keep": 1} if last_only else {}
    out = model(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=pos.to(dev),
        past_key_values=cache,
        use_cache=True,
        **kw,
    )
    return out.logits[:, -1, :]


def _log_mix(logq: torch.Tensor, logp: torch.Tensor, a: float) -> torch.Tensor:
    """log(a*p + (1-a)*q), exact at a = 0 and a = 1."""
    if a == 0.0:
        return logq
    if a == 1.0:
        return logp
    return torch.logaddexp(logp + math.log(a), logq + math.log1p(-a))


def sample(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    mix_alpha: float = 0.2,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    _skip_finished: bool = True,
    _last_logits_only: bool = True,
) -> Rollout:
    """Sample responses from p~ = a*p + (1-a)*q, recording log q, log p~ and log p per token.

    ``prompt_ids``/``prompt_mask`` (B, P) must be LEFT-padded. A row stops after its EOS (kept as
    a valid token) or after ``max_new_tokens``; T is the longest response. Both models run in
    eval mode under ``no_grad`` (their training flags are restored). ``generator`` must live on
    the student's device. With top_k/top_p, a token drawn from one model's support may lie
    outside the other's: its log-prob is then -inf. The private flags turn off the
    optimisations (finished-row skipping, last-position-only logits) for testing.
    """
    if teacher is None:
        raise ValueError("sample() needs a teacher: the MiniLLM reward uses teacher_logp")
    if not 0.0 <= mix_alpha <= 1.0:
        raise ValueError(f"mix_alpha must be in [0, 1], got {mix_alpha}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
        raise ValueError("prompt_ids and prompt_mask must both be (B, P)")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be LEFT-padded (prompt_mask[:, -1] must be all 1)")
    process_logits(torch.zeros(1, 2), temperature, top_k, top_p)  # validate settings early

    student, teacher = _unwrap(student), _unwrap(teacher)
    dev = _device_of(student)
    prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
    eos = torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=dev
    )
    a = float(mix_alpha)
    flags = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        with torch.no_grad():
            return _sample_loop(
                student, teacher, prompt_ids, prompt_mask, max_new_tokens, a,
                temperature, top_k, top_p, eos, pad_token_id, generator,
                _skip_finished, _last_logits_only,
            )  # fmt: skip
    finally:
        student.train(flags[0])
        teacher.train(flags[1])


def _sample_loop(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    a: float,
    temperature: float,
    top_k: int,
    top_p: float,
    eos: torch.Tensor,
    pad_token_id: int,
    generator: torch.Generator | None,
    skip_finished: bool,
    last_only: bool,
) -> Rollout:
    """The token-by-token loop behind :func:`sample` (called under no_grad)."""
    dev = prompt_ids.device
    B = prompt_ids.shape[0]
    N = max_new_tokens
    models = (student, teacher)
    caches = [DynamicCache(config=getattr(m, "config", None)) for m in models]
    last = [last_only and _accepts_logits_to_keep(m) for m in models]

    resp = torch.full((B, N), pad_token_id, dtype=prompt_ids.dtype, device=dev)  # (B, N)
    rmask = torch.zeros((B, N), dtype=prompt_mask.dtype, device=dev)  # (B, N)
    logps = torch.zeros((3, B, N), dtype=torch.float32, device=dev)  # (3, B, N): q, p~, p
    done = torch.zeros(B, dtype=torch.bool, device=dev)  # (B,)
    rows = torch.arange(B, device=dev)  # (Ba,) original index of each row still in the batch

    mask = prompt_mask  # (Ba, L)
    pos = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)  # (B, P)
    ids = prompt_ids  # (Ba, L) at prefill, then (Ba, 1)
    next_pos = prompt_mask.long().sum(-1, keepdim=True)  # (Ba, 1)
    T = 0
    for t in range(N):
        s_logits, t_logits = [
            _forward(m, ids, mask, pos, c, lo) for m, c, lo in zip(models, caches, last)
        ]  # (Ba, V) each
        logq = torch.log_softmax(process_logits(s_logits, temperature, top_k, top_p), -1)  # (Ba, V)
        logp = torch.log_softmax(
            process_logits(t_logits.to(dev), temperature, top_k, top_p), -1
        )  # (Ba, V)
        if a == 0.0:
            probs = logq.exp()
        elif a == 1.0:
            probs = logp.exp()
        else:
            probs = a * logp.exp() + (1.0 - a) * logq.exp()  # (Ba, V)
        if probs.shape[0] < B:
            # Same random stream as the full batch: multinomial draws per (row, vocab) entry.
            full = torch.zeros((B, probs.shape[1]), dtype=probs.dtype, device=dev)
            full[:, 0] = 1.0
            full[rows] = probs
            y = torch.multinomial(full, 1, generator=generator)[rows, 0]  # (Ba,)
        else:
            y = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (Ba,)

        alive = ~done[rows]  # (Ba,) all True when finished rows are skipped
        y = torch.where(alive, y, torch.full_like(y, pad_token_id))
        lq = logq.gather(-1, y[:, None])[:, 0]  # (Ba,)
        lp = logp.gather(-1, y[:, None])[:, 0]  # (Ba,)
        lm = _log_mix(lq, lp, a)  # (Ba,)
        zero = torch.zeros_like(lq)
        resp[rows, t] = y.to(resp.dtype)
        rmask[rows, t] = alive.to(rmask.dtype)
        logps[:, rows, t] = torch.stack([lq, lm, lp]).where(alive, zero)
        T = t + 1

        finished_now = alive & torch.isin(y, eos)  # (Ba,)
        done[rows] = done[rows] | finished_now
        if t == N - 1 or bool(done.all()):
            break

        if skip_finished and all(hasattr(c, "batch_select_indices") for c in caches):
            keep = ~done[rows]  # (Ba,)
            if not bool(keep.all()):
                idx = keep.nonzero()[:, 0]  # (Ba',)
                for m, c in zip(models, caches):
                    c.batch_select_indices(idx.to(_device_of(m)))
                rows, y, mask, next_pos = rows[idx], y[idx], mask[idx], next_pos[idx]
        ids = y[:, None].to(prompt_ids.dtype)  # (Ba, 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (Ba, L + 1)
        pos = next_pos
        next_pos = next_pos + 1

    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=resp[:, :T].contiguous(),
        response_mask=rmask[:, :T].contiguous(),
        student_logp=logps[0, :, :T].contiguous(),
        mix_logp=logps[1, :, :T].contiguous(),
        teacher_logp=logps[2, :, :T].contiguous(),
    )

"""Teacher-mixed rollout sampler for on-policy distillation (MiniLLM).

Notation: teacher p, student q, mixture p~ = a*p + (1-a)*q with a = ``mix_alpha``
(MiniLLM uses a = 0.2; a = 0 is pure student sampling). Both models step token by token, each
with its own KV cache; at every step both next-token logits go through :func:`process_logits`,
the next token is drawn from p~ and log q, log p~ and log p of that token are recorded.

Function boundary (what any sampler backend must honour, so a vLLM-backed sampler can be a
drop-in replacement with the same signature as :func:`sample`):

- input: LEFT-padded ``prompt_ids``/``prompt_mask`` (B, P) plus the sampling settings and
  ``vocab``, the tokenizer's vocabulary size: head rows beyond it (padded heads, e.g. Qwen's) are
  dropped before any softmax, so they are never drawn and get no probability mass;
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

This is one of the two generation paths, and it stays separate from
:func:`minidistill.generation.evaluation.generate_ids` (HF ``generate``, which evaluation, SeqKD data and
``analysis.sample_and_score`` share) because it steps two models in lockstep, draws from their
mixture and records per-token log q, log p~ and log p, none of which ``generate`` can do; both
share :func:`process_logits` for temperature/top-k/top-p.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minidistill.functional.losses import log_mix
from minidistill.models.logits import (
    accepts_logits_to_keep,
    hf_model,
    length_chunks,
    model_device,
    response_hidden,
    response_logits,
    split_head,
    unwrap,
)

__all__ = ["DECODE_MODES", "Rollout", "process_logits", "release_static_caches", "resolve_decode", "sample", "score"]


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
    # (B, T, H) the teacher's final hidden states predicting each y_t (model dtype), or None; the
    # loss rebuilds the teacher logits from them with the LM head (see minidistill.models.logits)
    teacher_hidden: torch.Tensor | None = None
    # (B,) bool: the row stopped on EOS (False: cut at max_new_tokens), or None if unknown
    ended: torch.Tensor | None = None
    # (B, T, K) a served teacher's top-K ids / log-probs at each response position (-inf: unused
    # slot), or None: what its single-step term reads instead of hidden states (``teacher.served``)
    teacher_topk_ids: torch.Tensor | None = None
    teacher_topk_logp: torch.Tensor | None = None
    # (B,) bool: the row was drawn from the mixture (a > 0) rather than from the student alone, or
    # None: every row as the sampler's mix_alpha says. Set by MiniLLM's split buffers
    # (``student_rows``), where only the rows drawn from the student carry the long-term term
    mixed: torch.Tensor | None = None

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
        return Rollout(**{f.name: _maybe(getattr(self, f.name), lambda x: x.to(device)) for f in fields(self)})

    def select(self, rows: slice | Sequence[int] | torch.Tensor) -> Rollout:
        """Return the rows ``rows`` (a slice, index list/tensor or bool mask), e.g. a minibatch.

        The response columns are trimmed to the longest selected response.
        """
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, device=self.prompt_ids.device)
        out = {f.name: _maybe(getattr(self, f.name), lambda x: x[rows]) for f in fields(self)}
        t = int(out["response_mask"].sum(-1).max().item()) if out["response_mask"].numel() else 0
        for name in RESPONSE_FIELDS:
            out[name] = _maybe(out[name], lambda x: x[:, :t])
        return Rollout(**out)

    def split(self, minibatch_size: int) -> list[Rollout]:
        """Consecutive minibatches of ``minibatch_size`` rows (the last may be smaller)."""
        return [self.select(slice(i, i + minibatch_size)) for i in range(0, self.batch_size, minibatch_size)]


RESPONSE_FIELDS = (
    "response_ids",
    "response_mask",
    "student_logp",
    "mix_logp",
    "teacher_logp",
    "teacher_hidden",
    "teacher_topk_ids",
    "teacher_topk_logp",
)


def _maybe(x, fn):
    return None if x is None else fn(x)


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
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


def _cache_kw(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache argument: ``cache`` (transformers >= 5.2x), else the
    older ``past_key_values``."""
    params = inspect.signature(hf_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _head_rows(model: torch.nn.Module) -> int | None:
    """Rows of the model's output head (its vocabulary width), None when it has no plain head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(head, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) else None


class _Stepper:
    """One model's cached token-by-token forward: last-position logits (and final hidden state).

    With a :func:`~minidistill.models.logits.split_head` split it runs the backbone and applies the LM
    head to the last position only, keeping the hidden state; otherwise the model's own forward
    with ``logits_to_keep=1`` (when ``last_only``).
    """

    def __init__(self, model: torch.nn.Module, last_only: bool, keep_hidden: bool):
        self.model = model
        self.cache = DynamicCache(config=getattr(model, "config", None))
        self.split = split_head(model) if keep_hidden else None
        self.kw = {"logits_to_keep": 1} if last_only and accepts_logits_to_keep(model) else {}
        self.dev = model_device(model)
        self.cache_kw = _cache_kw(model)

    def __call__(self, ids, mask, pos) -> tuple[torch.Tensor, torch.Tensor | None]:
        args = dict(
            input_ids=ids.to(self.dev),
            attention_mask=mask.to(self.dev),
            position_ids=pos.to(self.dev),
            use_cache=True,
        )
        args[self.cache_kw] = self.cache
        if self.split is not None:
            backbone, head = self.split
            h = backbone(**args).last_hidden_state[:, -1, :]  # (Ba, H)
            return head(h), h
        return self.model(**args, **self.kw).logits[:, -1, :], None  # (Ba, V)

    def keep_rows(self, idx: torch.Tensor) -> None:
        self.cache.batch_select_indices(idx.to(self.dev))


# --- the static decode path (a fixed-shape KV cache, optionally a compiled decode step) ----------

DECODE_MODES = ("auto", "dynamic", "static", "compiled")
# Errors of the static/compiled path under decode "auto" (which then falls back to the dynamic
# path for the rest of the process); an explicit "static"/"compiled" raises instead.
_AUTO_FAILED: list[str] = []

# Persistent per-model state of the static path: {model: {key: _StaticState}}. A StaticCache and
# the compiled step that closes over it are reused by every later call with the same key (batch,
# cache length bucket, head split, compile, autocast dtype), as HF ``generate`` reuses its static
# cache: a new cache object per call would make torch.compile recompile (and re-record its CUDA
# graphs) at every rollout batch. The caches stay allocated between calls, and since each entry's
# step closes over its model, an entry also keeps its model alive (the weak keys do not free it):
# :func:`release_static_caches` frees them (the stages' student and teacher live for the run anyway).
_STATIC: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _StaticState:
    cache: StaticCache
    step: object  # (ids (B, 1), mask (B, L), pos (B, 1)) -> (logits (B, V), hidden (B, H) or None)
    compiled: bool


def release_static_caches(model: torch.nn.Module | None = None) -> None:
    """Free the static KV caches (and compiled decode steps) kept for ``model`` (None: all models)."""
    if model is None:
        _STATIC.clear()
    else:
        _STATIC.pop(unwrap(model), None)


def _cache_len(prompt_len: int, max_new_tokens: int) -> int:
    """Static cache length for a prompt width and a response limit, rounded up to a power of two
    (at least 64), so prompt batches of different widths share one cache and one compiled step."""
    n = prompt_len + max_new_tokens
    return max(64, 1 << (n - 1).bit_length())


def _can_go_static(model: torch.nn.Module | None) -> bool:
    """A plain (or peft-wrapped) transformers model whose forward takes a StaticCache and compiles."""
    if model is None:
        return True
    if not hasattr(model, "config") or type(model).__name__.startswith("FSDP"):
        return False
    base = hf_model(model)
    return bool(getattr(base, "_can_compile_fullgraph", False)) and hasattr(base, "config")


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:  # noqa: BLE001 - any import problem means no triton
        return False


def resolve_decode(decode: str, student: torch.nn.Module, teacher: torch.nn.Module | None) -> str:
    """The decode path ``decode`` stands for with these models: ``auto`` is ``compiled`` when the
    student is on a CUDA device, triton is there and both models take a static cache, else
    ``dynamic`` (today's path: on CPU the static cache measured no faster, see README "One GPU").
    ``static``/``compiled`` on a model that cannot take a static cache is an error."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    student, teacher = unwrap(student), unwrap(teacher) if teacher is not None else None
    ok = _can_go_static(student) and _can_go_static(teacher)
    if decode == "auto":
        cuda = model_device(student).type == "cuda"
        return "compiled" if cuda and ok and _has_triton() else "dynamic"
    if decode != "dynamic" and not ok:
        raise ValueError(
            f"decode={decode!r} needs transformers models that support a static KV cache "
            "(_can_compile_fullgraph); use decode='dynamic'"
        )
    return decode


def _static_state(model, batch: int, length: int, split, kw: dict, compile_step: bool) -> _StaticState:
    amp = (
        torch.get_autocast_dtype(model_device(model).type)
        if torch.is_autocast_enabled(model_device(model).type)
        else None
    )
    key = (batch, length, split is not None, compile_step, amp)
    per_model = _STATIC.setdefault(model, {})
    state = per_model.get(key)
    if state is None:
        cache = StaticCache(config=hf_model(model).config, max_cache_len=length)
        cache_kw = _cache_kw(model)

        def step(ids, mask, pos):
            args = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            args[cache_kw] = cache
            if split is not None:
                backbone, head = split
                h = backbone(**args).last_hidden_state[:, -1, :]  # (B, H)
                return head(h), h
            return model(**args, **kw).logits[:, -1, :], None  # (B, V)

        if compile_step:
            cuda = model_device(model).type == "cuda"
            # reduce-overhead = CUDA graphs on CUDA; shapes are static by construction (dynamic=False)
            step = torch.compile(step, mode="reduce-overhead" if cuda else "default", dynamic=False)
        state = per_model[key] = _StaticState(cache, step, compile_step)
    state.cache.reset()  # zero keys/values in place (addresses stay: compiled graphs keep them)
    return state


class _StaticStepper:
    """One model's decode over a :class:`transformers.StaticCache` of fixed shape (B, L): the
    prompt prefill runs eagerly and fills slots 0..P-1; every decode step then has the same input
    shapes ((B, 1) ids and positions, the constant (B, L) mask prompt_mask + ones, where causality
    hides the slots not yet written), so it can be compiled once and replayed (CUDA graphs).
    Finished rows are not dropped: they keep decoding (their tokens are masked by the loop)."""

    def __init__(self, model, last_only: bool, keep_hidden: bool, batch: int, length: int, compile_step: bool):
        self.model = model
        self.split = split_head(model) if keep_hidden else None
        self.kw = {"logits_to_keep": 1} if last_only and accepts_logits_to_keep(model) else {}
        self.dev = model_device(model)
        self.length = length
        self.state = _static_state(model, batch, length, self.split, self.kw, compile_step)
        self.cache = self.state.cache
        self.mask = None  # (B, L) after the prefill

    def __call__(self, ids, mask, pos) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids, pos = ids.to(self.dev), pos.to(self.dev)
        if self.mask is None:  # prefill (eager; the padding mask is padded to L with zeros by transformers)
            mask = mask.to(self.dev)
            self.mask = torch.cat([mask, mask.new_ones((mask.shape[0], self.length - mask.shape[1]))], dim=1)
            args = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            args[_cache_kw(self.model)] = self.cache
            if self.split is not None:
                backbone, head = self.split
                h = backbone(**args).last_hidden_state[:, -1, :]  # (B, H)
                return head(h), h
            return self.model(**args, **self.kw).logits[:, -1, :], None
        if self.state.compiled and self.dev.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs were consumed
        logits, h = self.state.step(ids, self.mask, pos)
        if self.state.compiled:  # CUDA-graph outputs are overwritten by the next replay
            logits, h = logits.clone(), (h.clone() if h is not None else None)
        return logits, h

    def keep_rows(self, idx: torch.Tensor) -> None:  # pragma: no cover - the static loop never drops rows
        raise RuntimeError("the static decode path keeps its batch shape")


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
    vocab: int | None = None,
    generator: torch.Generator | None = None,
    keep_teacher_hidden: bool = True,
    score_chunk: int = 8,
    decode: str = "auto",
    _skip_finished: bool = True,
    _last_logits_only: bool = True,
    _teacher_after: bool = True,
) -> Rollout:
    """Sample responses from p~ = a*p + (1-a)*q, recording log q, log p~ and log p per token.

    ``prompt_ids``/``prompt_mask`` (B, P) must be LEFT-padded. A row stops after its EOS (kept as
    a valid token) or after ``max_new_tokens``; T is the longest response. Both models run in
    eval mode under ``no_grad`` (every module's training flag is restored). ``generator`` must live on
    the student's device. With top_k/top_p, a token drawn from one model's support may lie
    outside the other's: its log-prob is then -inf.

    ``vocab`` is the usable vocabulary (``len(tokenizer)``, the stages pass ``run.vocab_size``):
    every distribution (q, p, p~ and the recorded log-probs) is over logits ``[..., :vocab]``, the
    ids are < ``vocab``, and teacher and student heads may be of different widths >= ``vocab``.
    None means the whole head, which then must be as wide in both models.

    At a = 0 the teacher does not step along: it scores the finished responses in one
    teacher-forced pass (``score_chunk`` rows at a time), which draws the same tokens and gives
    the same log p up to float rounding, for far fewer, larger matmuls. ``keep_teacher_hidden``
    stores the teacher's final hidden states in the rollout (when the teacher's logits are
    head(hidden), see :mod:`minidistill.logits`). ``teacher=None`` (a = 0 only) leaves
    ``teacher_logp`` at 0 for the caller to fill (MiniLLM across tokenizers scores the text). The private flags turn the optimisations off
    for testing (finished-row skipping, last-position-only logits, the a = 0 teacher pass).

    ``decode`` picks the decode loop (same tokens for the same generator, log-probs equal to float
    rounding): ``dynamic`` grows a DynamicCache per model and drops finished rows from the batch;
    ``static`` decodes over a fixed-shape StaticCache per model (length: prompt width + limit rounded
    up to a power of two), keeping finished rows in the batch (masked) so every step has the same
    shapes; ``compiled`` is ``static`` with the decode step under ``torch.compile`` (mode
    ``reduce-overhead``, i.e. CUDA graphs, on CUDA). ``auto``: ``compiled`` on CUDA, ``dynamic``
    elsewhere (:func:`resolve_decode`); should the static/compiled path fail under ``auto`` (a
    compiler error, say), the call warns once and redraws on the dynamic path with the generator's
    state restored, and later calls go straight to it. The static caches are kept for the next
    call with the same shapes (:func:`release_static_caches` frees them).
    """
    if teacher is None and mix_alpha > 0:
        raise ValueError("sample() needs a teacher for mix_alpha > 0 (teacher-mixed sampling)")
    if not 0.0 <= mix_alpha <= 1.0:
        raise ValueError(f"mix_alpha must be in [0, 1], got {mix_alpha}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
        raise ValueError("prompt_ids and prompt_mask must both be (B, P)")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be LEFT-padded (prompt_mask[:, -1] must be all 1)")
    if vocab is not None and vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    process_logits(torch.zeros(1, 2), temperature, top_k, top_p)  # validate settings early
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")

    student, teacher = unwrap(student), unwrap(teacher)
    widths = {w for w in (_head_rows(student), _head_rows(teacher)) if w is not None}
    if vocab is None and len(widths) > 1:
        raise ValueError(
            f"student and teacher heads differ in width ({sorted(widths)} rows): pass "
            "vocab=len(tokenizer) so both distributions are over the same tokens"
        )
    dev = model_device(student)
    prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
    eos = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=dev)
    a = float(mix_alpha)
    settings = (temperature, top_k, top_p)
    models_ = [m for m in (student, teacher) if m is not None]
    flags = [(m, m.training) for model in models_ for m in model.modules()]  # per module: a policy
    for model in models_:  # trained without dropout has a mixed state that a plain .train(flag) would lose
        model.eval()
    try:
        with torch.no_grad():
            teacher_steps = not (a == 0.0 and _teacher_after)
            mode = resolve_decode(decode, student, teacher if teacher_steps else None)
            fallback = decode == "auto" and mode != "dynamic"
            if fallback and _AUTO_FAILED:
                mode, fallback = "dynamic", False
            rng = generator.get_state() if fallback and generator is not None else None

            def loop(mode):
                return _sample_loop(
                    student, teacher if teacher_steps else None, prompt_ids, prompt_mask, max_new_tokens, a,
                    settings, eos, pad_token_id, generator, _skip_finished, _last_logits_only, keep_teacher_hidden,
                    vocab, mode,
                )  # fmt: skip

            try:
                ro = loop(mode)
            except Exception as e:  # noqa: BLE001 - auto only: today's path instead, said once
                if not fallback:
                    raise
                _AUTO_FAILED.append(f"{type(e).__name__}: {e}")
                warnings.warn(
                    f"sampler decode 'auto': the {mode} decode path failed ({type(e).__name__}: {str(e)[:300]}); "
                    "using the dynamic path from now on (set decode: dynamic to skip the attempt)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                release_static_caches()
                if rng is not None:
                    generator.set_state(rng)  # the same draws as if the dynamic path had run first
                ro = loop("dynamic")
            if not teacher_steps and teacher is not None:
                ro.teacher_logp, ro.teacher_hidden = score(
                    teacher, ro, settings, keep_teacher_hidden, score_chunk, vocab
                )
            return ro
    finally:
        for m, flag in flags:
            m.training = flag


def score(
    model: torch.nn.Module,
    ro: Rollout,
    settings: tuple[float, int, float] = (1.0, 0, 1.0),
    keep_hidden: bool = True,
    chunk: int = 8,
    vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log p(y_t) of a rollout's tokens under the processed distribution over the
    first ``vocab`` logits (None: the whole head), and the final hidden states when
    ``keep_hidden`` and the model splits (else None). (B, T), (B, T, H)

    Runs ``chunk`` rows of similar prompt length at a time under ``no_grad``, without their
    all-padding columns; only response positions reach the LM head.
    """
    dev = model_device(model)
    split = split_head(model) if keep_hidden else None
    B, T = ro.response_ids.shape
    logp_out = torch.zeros((B, T), dtype=torch.float32, device=dev)
    hidden_out = None
    with torch.no_grad():
        for rows, p0, t1 in length_chunks(ro.prompt_mask, ro.response_mask, chunk):
            rows = rows.to(ro.prompt_ids.device)
            pi, pm = ro.prompt_ids[rows, p0:].to(dev), ro.prompt_mask[rows, p0:].to(dev)
            ri, rm = ro.response_ids[rows, :t1].to(dev), ro.response_mask[rows, :t1].to(dev)
            if split is not None:
                h = response_hidden(model, pi, pm, ri, rm) * rm[..., None]  # (b, t1, H), zero at padding
                logits = split[1](h)[..., :vocab]  # (b, t1, V)
                if hidden_out is None:
                    hidden_out = torch.zeros((B, T, h.shape[-1]), dtype=h.dtype, device=dev)
                hidden_out[rows.to(dev), :t1] = h
            else:
                logits = response_logits(model, pi, pm, ri, rm, vocab)  # (b, t1, V)
            logp = torch.log_softmax(process_logits(logits, *settings), -1)  # (b, t1, V)
            lp = logp.gather(-1, ri[..., None])[..., 0]  # (b, t1)
            logp_out[rows.to(dev), :t1] = torch.where(rm.bool(), lp, torch.zeros_like(lp))
    out_dev = ro.response_ids.device
    return logp_out.to(out_dev), (hidden_out.to(out_dev) if hidden_out is not None else None)


def _sample_loop(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    a: float,
    settings: tuple[float, int, float],
    eos: torch.Tensor,
    pad_token_id: int,
    generator: torch.Generator | None,
    skip_finished: bool,
    last_only: bool,
    keep_hidden: bool,
    vocab: int | None = None,
    decode: str = "dynamic",
) -> Rollout:
    """The token-by-token loop behind :func:`sample` (called under no_grad). Without a teacher
    (a = 0, scored afterwards) ``teacher_logp`` is left at 0. Both models' logits are cut to
    ``[..., :vocab]`` before :func:`process_logits` (None: the whole head). ``decode``: ``dynamic``,
    or ``static``/``compiled`` (fixed batch shape: finished rows are masked, never dropped)."""
    dev = prompt_ids.device
    B = prompt_ids.shape[0]
    N = max_new_tokens
    static = decode in ("static", "compiled")
    if static:
        L = _cache_len(prompt_ids.shape[1], N)
        make = lambda m, hid: _StaticStepper(m, last_only, hid, B, L, decode == "compiled")  # noqa: E731
        skip_finished = False
    else:
        make = lambda m, hid: _Stepper(m, last_only, hid)  # noqa: E731
    steppers = [make(student, False)]
    if teacher is not None:
        steppers.append(make(teacher, keep_hidden))

    resp = torch.full((B, N), pad_token_id, dtype=prompt_ids.dtype, device=dev)  # (B, N)
    rmask = torch.zeros((B, N), dtype=prompt_mask.dtype, device=dev)  # (B, N)
    logps = torch.zeros((3, B, N), dtype=torch.float32, device=dev)  # (3, B, N): q, p~, p
    hidden = None  # (B, N, H) teacher hidden states, allocated at the first step
    done = torch.zeros(B, dtype=torch.bool, device=dev)  # (B,)
    rows = torch.arange(B, device=dev)  # (Ba,) original index of each row still in the batch

    mask = prompt_mask  # (Ba, L)
    pos = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)  # (B, P)
    ids = prompt_ids  # (Ba, L) at prefill, then (Ba, 1)
    next_pos = prompt_mask.long().sum(-1, keepdim=True)  # (Ba, 1)
    T = 0
    for t in range(N):
        outs = [st(ids, mask, pos) for st in steppers]
        logq = torch.log_softmax(process_logits(outs[0][0][:, :vocab], *settings), -1)  # (Ba, V)
        if teacher is not None:
            logp = torch.log_softmax(process_logits(outs[1][0][:, :vocab].to(dev), *settings), -1)  # (Ba, V)
            if logp.shape[-1] != logq.shape[-1]:
                raise ValueError(
                    f"student and teacher heads differ in width ({logq.shape[-1]} vs {logp.shape[-1]} "
                    "rows): pass vocab=len(tokenizer) so both distributions are over the same tokens"
                )
            h = outs[1][1]
            if h is not None:
                if hidden is None:
                    hidden = torch.zeros((B, N, h.shape[-1]), dtype=h.dtype, device=dev)
                hidden[rows, t] = h.to(dev)
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
        lp = logp.gather(-1, y[:, None])[:, 0] if teacher is not None else torch.zeros_like(lq)  # (Ba,)
        lm = log_mix(lp, lq, a)  # (Ba,)
        zero = torch.zeros_like(lq)
        resp[rows, t] = y.to(resp.dtype)
        rmask[rows, t] = alive.to(rmask.dtype)
        logps[:, rows, t] = torch.stack([lq, lm, lp]).where(alive, zero)
        T = t + 1

        finished_now = alive & torch.isin(y, eos)  # (Ba,)
        done[rows] = done[rows] | finished_now
        if t == N - 1 or bool(done.all()):
            break

        if skip_finished:
            keep = ~done[rows]  # (Ba,)
            if not bool(keep.all()):
                idx = keep.nonzero()[:, 0]  # (Ba',)
                for st in steppers:
                    st.keep_rows(idx)
                rows, y, mask, next_pos = rows[idx], y[idx], mask[idx], next_pos[idx]
        ids = y[:, None].to(prompt_ids.dtype)  # (Ba, 1)
        if not static:  # the static steppers hold their own (B, L) mask
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (Ba, L + 1)
        pos = next_pos
        next_pos = next_pos + 1

    if hidden is not None:
        hidden = hidden[:, :T] * rmask[:, :T, None].to(hidden.dtype)  # zero at padding
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=resp[:, :T].contiguous(),
        response_mask=rmask[:, :T].contiguous(),
        student_logp=logps[0, :, :T].contiguous(),
        mix_logp=logps[1, :, :T].contiguous(),
        teacher_logp=logps[2, :, :T].contiguous(),
        teacher_hidden=hidden.contiguous() if hidden is not None else None,
        ended=done.clone(),
    )

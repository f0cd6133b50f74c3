"""MiniLLM: minimise the reverse KL, KL(q_student || p_teacher), over whole responses.

The module reads top to bottom as the update does:

0. Settings: ``Config``; the named ``preset`` (``PRESETS``, below it) fills the fields left null
   (``Config.apply_preset``, called by validation); any field set in the recipe wins.
1. Collect (``collect_buffer``): draw ``num_rollouts`` prompts, sample responses from the mixture
   p~ = a*p + (1-a)*q (``sampler.sample``; both models keep KV caches) recording per token
   log q (at sampling time), log p~ and log p. Rewards r_t = log p - log q come from those
   numbers (no second teacher pass); the return R (from the next token, or including the
   current one; discount gamma^(t'-t); divided by the number of *valid* remaining tokens) is
   turned into advantages (optionally whitened with statistics over valid tokens of every
   process). Padding never enters any of it (``advantages.py``, tested for it). The result is a
   ``Buffer``: the ``Rollout`` plus those per-token scores and each PPO epoch's row order.
2. Iterate (``RolloutSource.minibatches``, the loop's batch source), written out as
       for each iteration: buffer = collect
           for epoch in range(ppo_epochs): for each minibatch of the epoch's order: one micro-batch
       then discard the buffer and sample again with the updated student.
   Its position (iteration, epoch, minibatch) is explicit state, checkpointed with the buffer
   and the RNGs, so a run killed anywhere resumes bitwise where it stopped.
3. The loss of one minibatch (``minillm_objective``), two terms the loop averages separately:
   ``response``, summed over response tokens (``minillm_loss``):
       long-term   -min(rho*A, clip(rho, 1-eps, 1+eps)*A),  rho = q_theta(y_t) / p~(y_t)
     + single-step  KL(q_theta(.|y_<t) || p(.|y_<t)) over the whole vocabulary, exact,
                    optionally times an importance weight: the per-step q/p~ of y_t
                    (``importance: step``, the paper's) or the prefix product
                    prod_{t'<t} q/p~ (``importance: exact``, which also multiplies the
                    long-term advantage by the product over the other tokens)
   and ``lm``, summed over corpus tokens: lm_coef * L_PT, the LM loss on a plain-text batch
   (mixed with token-level KD to the teacher on that text by ``kd_ratio``, as the official code).
   The loop divides each term by its own global count, so L_PT is a per-corpus-token mean, not
   rescaled by the number of response tokens (with one process and grad_accum 1 the objective
   is exactly the former ``(pg + ss)/response_tokens + lm_coef * L_PT``; with several
   micro-batches L_PT is the mean over all of the step's corpus tokens instead of a
   response-token-weighted mean of per-micro-batch means).
   The teacher's full-vocabulary logits for the single-step term come from the last hidden
   states the sampler kept (one LM-head matmul per minibatch, no teacher forward): caching the
   logits themselves would take rollouts x length x vocab floats (6 GB for 256 x 256 x 49k in
   fp16), and top-k caching would make the term inexact. L_PT's CE and KD terms share one fused
   chunked pass over the vocabulary (``losses.forward_kl_and_ce``).
4. Validation samples responses for the validation prompts and scores ROUGE-L against the
   references; the best model goes to ``<stage>/best``.

Across tokenizers (``cross_tokenizer: true``; the estimator is in ``minidistill.xtok``): the student
samples alone (a = 0), the teacher scores the text of each response in its own tokenization after
its own rendering of the prompt (one teacher-forced pass), and each teacher token's log-prob is
credited to the student token that completes that token's last character. The per-token reward
is that spread log p minus log q(y_t); a response's rewards sum exactly to
log p(text) - log q(y) (the sequence-level reverse-KL sample), and returns/advantages/PPO are
unchanged. Refused there, each with one line: ``single_step`` (an exact KL over one vocabulary at
every position), ``mix_alpha`` > 0 (drawing a token from a*p + (1-a)*q needs p and q over the same
tokens at every step; unset, it is 0 here instead of the preset's 0.2) and L_PT's ``kd_ratio`` > 0
(token-level KD on the corpus over one vocabulary; use a pd stage with kd_kind uld for that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import advantages as adv
from .. import data, evaluation, losses, xtok
from .. import logits as fwd
from ..batches import ShuffledBatches
from ..config import TrainConfig, opt
from ..errors import UserError
from ..loop import train
from ..sampler import RESPONSE_FIELDS, Rollout, process_logits, sample, score
from ..tracking import console
from . import Plot, Stage

# ----------------------------------------------------------------------------------------------
# 0. settings
# ----------------------------------------------------------------------------------------------


@dataclass
class Config(TrainConfig):
    lr: float = opt(5e-6, "Peak learning rate (paper: 5e-6).", min=0.0)
    scheduler: str = opt(
        "constant", "LR schedule (official: constant after warm-up).", choices=["constant", "cosine", "linear", "wsd"]
    )
    warmup_steps: int = opt(100, "Linear warm-up steps (official: 100).", min=0)
    weight_decay: float = opt(1e-6, "AdamW weight decay (official: 1e-6).", min=0.0)
    batch_size: int = opt(8, "PPO minibatch size (rollouts per micro-batch).", min=1)
    preset: str = opt(
        "minidistill",
        "Named defaults for the fields below that are null: minidistill, paper, official.",
        choices=["minidistill", "paper", "official"],
    )
    # --- sampling ------------------------------------------------------------------------------
    num_rollouts: int = opt(256, "Rollouts per iteration, all processes together (paper: 256).", min=1)
    rollout_batch_size: int = opt(16, "Prompts per sampling batch.", min=1)
    ppo_epochs: int = opt(4, "Passes over each rollout buffer (paper: 4).", min=1)
    max_new_tokens: int = opt(256, "Response token limit (paper: 512 - prompt).", min=1)
    mix_alpha: float | None = opt(
        None, "Teacher share a in the sampling mixture a*p + (1-a)*q (paper: 0.2; 0 = pure student).", min=0.0, max=1.0
    )
    temperature: float = opt(1.0, "Sampling temperature (paper: 1).", gt=0.0)
    top_k: int = opt(0, "Top-k for sampling and log q (0 = off; paper: off).", min=0)
    top_p: float = opt(1.0, "Top-p for sampling and log q (1 = off; paper: off).", gt=0.0, max=1.0)
    decode: str = opt(
        "auto",
        "Sampler decode loop: dynamic (growing KV caches, finished rows dropped), static (fixed-shape "
        "StaticCache, finished rows masked), compiled (static + torch.compile of the decode step; CUDA "
        "graphs on CUDA); auto = compiled on CUDA, dynamic elsewhere. Same tokens for the same seed.",
        choices=["auto", "dynamic", "static", "compiled"],
    )
    # --- returns and advantages ----------------------------------------------------------------
    include_current: bool | None = opt(None, "Return includes r_t (official) instead of starting at r_{t+1} (paper).")
    gamma: float | None = opt(None, "Discount, applied as gamma^(t'-t) (paper 1.0, official 0.95).", min=0.0, max=1.0)
    length_norm: bool | None = opt(None, "Divide the return by the number of valid tokens it sums.")
    bootstrap_truncated: bool | None = opt(
        None,
        "A response cut at max_new_tokens: its last token's next-token return "
        "(nothing observed after it) is the row's mean reward, not the 0 that only a "
        "finished response's EOS earns (off: paper/official).",
    )
    whiten: bool | None = opt(None, "Whiten advantages (statistics over valid tokens of all processes).")
    reward_scale: float | None = opt(None, "Multiply rewards (official: 2.0).", gt=0.0)
    reward_clip: float = opt(
        100.0, "Clip each token's reward to +-this (official: 100; catches log p = -inf under top-k/top-p).", gt=0.0
    )
    clip_eps: float | None = opt(
        None, "PPO clip range for rho (0.2); null in a preset keeps it, set 0 to disable.", min=0.0
    )
    recompute_logp: str = opt(
        "auto",
        "Behaviour log q (and log p~) from one full no-grad forward over the finished rollouts, "
        "the forward the loss runs, instead of the sampler's KV-cached decoding (they differ by "
        "rounding: ~1e-2 in bf16, ~1e-6 in fp32); auto = on in bf16/fp16 runs, off in fp32.",
        choices=["auto", "always", "never"],
    )
    importance: str = opt(
        "step",
        "Importance weights for mixed sampling. step (paper): rho = q/p~ on the long-term term, q/p~ of "
        "the token on the single-step term; biased when mix_alpha > 0. exact: whole-sequence product on the "
        "long-term term, prefix product on the single-step term; the expected gradient is exactly that of "
        "KL(q||p) with gamma 1, include_current/length_norm/whiten false and clip_eps 0 (first PPO epoch); "
        "variance grows like (1/(1-a))^T. exact turns single_step_importance_weight on (an explicit false "
        "is an error).",
        choices=["step", "exact"],
    )
    # --- loss terms ----------------------------------------------------------------------------
    single_step: bool = opt(True, "Add the exact per-position reverse KL (single-step decomposition).")
    single_step_importance_weight: bool | None = opt(
        None,
        "Weight the single-step term by its importance weight (importance step: "
        "q/p~ of the token; exact: prefix product) (paper yes, official no; "
        "importance exact forces it on).",
    )
    pg_coef: float = opt(1.0, "Weight of the long-term (policy-gradient) term.", min=0.0)
    chunk_rows: int = opt(
        8,
        "Rows per policy forward in the loss, grouped by prompt length with padding columns "
        "dropped (the sums are the same for any value; larger = fewer, bigger matmuls).",
        min=1,
    )
    lm_coef: float = opt(1.0, "Weight of L_PT, the LM loss on data.corpus (0 = off).", min=0.0)
    lm_batch_size: int = opt(8, "Corpus blocks per micro-batch for L_PT.", min=1)
    kd_ratio: float = opt(
        0.5, "L_PT = (1-kd_ratio)*CE + kd_ratio*forward KL to the teacher on the text (official 0.5).", min=0.0, max=1.0
    )
    cross_tokenizer: bool = opt(
        False,
        "Teacher with another tokenizer: it scores the text of each response in its own tokenization and "
        "its token log-probs are spread over the student's tokens by character spans (minidistill.xtok); "
        "needs single_step: false, mix_alpha 0 (the default here), kd_ratio 0 when lm_coef > 0.",
    )
    # --- validation ----------------------------------------------------------------------------
    eval_examples: int = opt(64, "Validation prompts scored by sampled ROUGE-L.", min=1)
    eval_max_new_tokens: int | None = opt(None, "Response limit for validation (default max_new_tokens).", min=1)

    def validate(self, where: str) -> None:
        if self.importance == "exact" and self.single_step_importance_weight is False:
            raise UserError(
                f"{where}.single_step_importance_weight: importance 'exact' needs the single-step importance "
                "weight (the prefix product q/p~ of the earlier tokens); set it true or leave it unset"
            )
        if self.cross_tokenizer and self.mix_alpha is None:
            self.mix_alpha = 0.0
        self.apply_preset()
        if self.cross_tokenizer:
            self.check_cross_tokenizer(where)
        if (self.top_k > 0 or self.top_p < 1.0) and self.mix_alpha > 0:
            raise UserError(
                f"{where}.top_k/top_p: truncated sampling needs mix_alpha=0 (a token drawn from the teacher "
                f"can lie outside the student's kept set, where log q = -inf); got mix_alpha={self.mix_alpha}"
            )
        if self.num_rollouts < self.batch_size:
            raise UserError(
                f"{where}.num_rollouts: {self.num_rollouts} is fewer than one minibatch (batch_size {self.batch_size})"
            )

    def check_cross_tokenizer(self, where: str) -> None:
        if self.single_step:
            raise UserError(
                f"{where}.single_step: the single-step term is an exact KL over one vocabulary at every position, "
                "which a teacher with another tokenizer cannot give; set single_step: false with cross_tokenizer: true"
            )
        if self.mix_alpha > 0:
            raise UserError(
                f"{where}.mix_alpha: teacher-mixed sampling draws each token from a*p + (1-a)*q, which needs p and q "
                f"over the same tokens at every step; set mix_alpha: 0 with cross_tokenizer: true (got {self.mix_alpha})"
            )
        if self.lm_coef > 0 and self.kd_ratio > 0:
            raise UserError(
                f"{where}.kd_ratio: L_PT's KD term compares teacher and student token by token over one vocabulary; "
                "set kd_ratio: 0 (or lm_coef: 0) with cross_tokenizer: true (a pd stage with kd_kind: uld distils "
                "on text across tokenizers)"
            )

    def apply_preset(self) -> None:
        """Fill every field left null from the named preset (``PRESETS``); ``importance: exact``
        first sets single_step_importance_weight (it wins over the preset: official says false)."""
        if self.importance == "exact":
            self.single_step_importance_weight = True
        for key, value in get_preset(self.preset).items():
            if getattr(self, key) is None:
                setattr(self, key, value)


# The presets (see the ``advantages`` module docstring for what each estimator is and why).
PRESETS: dict[str, dict[str, Any]] = {
    # minidistill's default: the paper's estimator (return from the NEXT token, gamma 1, no
    # double-counted single-step part, per-step weights) plus whitening over valid tokens (a
    # baseline and a 1/std(R) re-weighting of the long-term term against the single-step term:
    # not direction-preserving, but the official lr/clip transfer) and truncation bootstrapping.
    "minidistill": {
        "include_current": False,
        "gamma": 1.0,
        "length_norm": True,
        "bootstrap_truncated": True,
        "whiten": True,
        "reward_scale": 1.0,
        "single_step_importance_weight": True,
        "clip_eps": 0.2,
        "mix_alpha": 0.2,
    },
    "paper": {
        "include_current": False,
        "gamma": 1.0,
        "length_norm": True,
        "bootstrap_truncated": False,
        "whiten": False,
        "reward_scale": 1.0,
        "single_step_importance_weight": True,
        "clip_eps": 0.2,
        "mix_alpha": 0.2,
    },
    "official": {
        "include_current": True,
        "gamma": 0.95,
        "length_norm": True,
        "bootstrap_truncated": False,
        "whiten": True,
        "reward_scale": 2.0,
        "single_step_importance_weight": False,
        "clip_eps": 0.2,
        "mix_alpha": 0.2,
    },
}


def get_preset(name: str) -> dict[str, Any]:
    """A fresh copy of the named preset ("minidistill", "paper" or "official")."""
    if name not in PRESETS:
        raise UserError(f"unknown MiniLLM preset {name!r}: expected one of {sorted(PRESETS)}")
    return dict(PRESETS[name])


# ----------------------------------------------------------------------------------------------
# 1. collect: rollouts -> advantages -> a buffer
# ----------------------------------------------------------------------------------------------


def advantages_for(cfg: Config, ro: Rollout, reduce_sum=lambda t: t) -> dict:
    """Rewards, returns and advantages for a rollout buffer (pure, given the global reduce)."""
    mask = ro.response_mask
    r = adv.token_rewards(ro.teacher_logp, ro.student_logp, mask, scale=cfg.reward_scale)
    r = r.clamp(-cfg.reward_clip, cfg.reward_clip)
    R = adv.returns(
        r,
        mask,
        gamma=cfg.gamma,
        include_current=cfg.include_current,
        length_norm=cfg.length_norm,
        ended=ro.ended if cfg.bootstrap_truncated else None,
    )
    A = R
    if cfg.whiten:
        stats = tuple(reduce_sum(s) for s in adv.masked_moments(R, mask))
        A = adv.whiten(R, mask, stats=stats)
    if cfg.importance == "exact":  # pg_loss's rho = q/p~ supplies w_t; this is the rest of the sequence's product
        A = A * adv.sequence_importance_weights(ro.student_logp, ro.mix_logp, mask).long_term
    w = adv.single_step_weights(ro.student_logp, ro.mix_logp, mask, cfg.importance)
    return {"rewards": r, "returns": R, "advantages": A, "single_step_weights": w}


def rollout_stats(buf: dict, eos_id: int, reduce_sum=lambda t: t, mix_alpha: float = 0.0) -> dict:
    """Mean reward, response length and EOS rate over the rollouts of every process (sums and
    counts go through ``reduce_sum``), and the mean of log q(y_t) - log p(y_t) over the sampled
    tokens: with pure student sampling (a = 0) that is a Monte Carlo estimate of the student's
    per-token reverse KL on its own samples (``rkl_estimate``); with a > 0 the tokens come from
    the mixture and the same mean is no estimate of the student's KL (teacher-drawn tokens pull it
    down), so it is logged as ``mix_log_ratio``."""
    m = buf["response_mask"].float()
    lengths = m.sum(-1)
    if buf.get("ended") is not None:
        eos = buf["ended"].float()
    else:
        last = buf["response_ids"].gather(1, (lengths.long() - 1).clamp(min=0)[:, None]).squeeze(1)
        eos = ((last == eos_id) & (lengths > 0)).float()
    sums = torch.stack(
        [
            (buf["rewards"] * m).sum(),
            ((buf["student_logp"] - buf["teacher_logp"]) * m).sum(),
            m.sum(),
            eos.sum(),
            torch.tensor(float(m.shape[0])),
        ]
    ).to(torch.float64)
    reward, log_ratio, tokens, n_eos, rows = reduce_sum(sums).tolist()
    return {
        "reward": reward / max(tokens, 1.0),
        ("rkl_estimate" if mix_alpha == 0 else "mix_log_ratio"): log_ratio / max(tokens, 1.0),
        "response_length": tokens / max(rows, 1.0),
        "eos_rate": n_eos / max(rows, 1.0),
    }


@dataclass
class Buffer:
    """One iteration's rollouts, the PPO buffer: the ``Rollout``, what the loss needs per token
    from the collection (``scores``: rewards, returns, advantages, single_step_weights, each
    (B, T) aligned with the responses), every PPO epoch's row order and the rollout statistics
    logged with each step of the iteration."""

    rollout: Rollout
    scores: dict[str, torch.Tensor]
    order: torch.Tensor  # (ppo_epochs, B) long: the rows of epoch e in order[e]
    stats: dict

    def minibatch(self, rows: torch.Tensor) -> dict:
        """Rows ``rows`` as the loss's batch: ``Rollout.select`` (response columns trimmed to the
        longest selected response) and the scores trimmed the same way."""
        ro = self.rollout.select(rows)
        t = ro.response_mask.shape[1]
        idx = torch.as_tensor(rows, device=self.rollout.prompt_ids.device)
        return {**rollout_tensors(ro), **{k: v[idx][:, :t] for k, v in self.scores.items()}}

    def tensors(self) -> dict:
        """Every tensor of the buffer but the order, by name (checkpoints)."""
        return {**rollout_tensors(self.rollout), **self.scores}

    @classmethod
    def from_tensors(cls, tensors: dict, order: torch.Tensor, stats: dict) -> Buffer:
        names = set(Rollout.__dataclass_fields__)
        return cls(
            Rollout(**{k: v for k, v in tensors.items() if k in names}),
            {k: v for k, v in tensors.items() if k not in names},
            order,
            stats,
        )


def rollout_tensors(ro: Rollout) -> dict:
    """The rollout's tensors by field name (fields that are None left out)."""
    return {f: getattr(ro, f) for f in ro.__dataclass_fields__ if getattr(ro, f) is not None}


def epoch_orders(seed: int, iteration: int, rows: int, ppo_epochs: int) -> torch.Tensor:
    """(ppo_epochs, rows): a fresh permutation of the buffer's rows per PPO epoch, all drawn from
    one generator seeded by the iteration, so the order is a function of (seed, iteration)."""
    g = torch.Generator().manual_seed(seed + 7919 * iteration)
    return torch.stack([torch.randperm(rows, generator=g) for _ in range(ppo_epochs)])


def collect_buffer(
    run,
    cfg: Config,
    student,
    prompts: list[list[int]],
    generator: torch.Generator,
    iteration: int,
    teacher_prompts: list[list[int]] | None = None,
) -> Buffer:
    """Sample responses to ``prompts`` with the current student, score them, compute advantages.
    ``teacher_prompts`` (cross_tokenizer): the same prompts in the teacher's tokenization, which
    then scores the responses' text (:func:`cross_tokenizer_logp`)."""
    acc = run.accelerator
    parts = []
    for i in range(0, len(prompts), cfg.rollout_batch_size):
        ids, mask = data.collate_prompts(prompts[i : i + cfg.rollout_batch_size], run.tokenizer.pad_token_id)
        with acc.autocast():
            parts.append(
                sample(
                    student,
                    None if cfg.cross_tokenizer else run.teacher,
                    ids,
                    mask,
                    max_new_tokens=cfg.max_new_tokens,
                    mix_alpha=cfg.mix_alpha,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,
                    top_p=cfg.top_p,
                    eos_token_id=run.tokenizer.eos_token_id,
                    pad_token_id=run.tokenizer.pad_token_id,
                    vocab=run.vocab_size,
                    generator=generator,
                    decode=cfg.decode,
                )
            )
    ro = concat_rollouts(parts, run.tokenizer.pad_token_id)
    if cfg.cross_tokenizer:
        with acc.autocast():
            ro.teacher_logp = cross_tokenizer_logp(run, cfg, ro, teacher_prompts)
    if recompute_logp(cfg, run.precision):
        ro = rescore_behaviour(student, ro, cfg, acc, run.vocab_size)
    reduce_sum = lambda t: acc.reduce(t.to(acc.device), "sum")  # noqa: E731
    scores = advantages_for(cfg, ro, reduce_sum=reduce_sum)
    stats = rollout_stats(
        {**rollout_tensors(ro), **scores}, run.tokenizer.eos_token_id, reduce_sum=reduce_sum, mix_alpha=cfg.mix_alpha
    )
    return Buffer(ro, scores, epoch_orders(run.recipe.seed, iteration, ro.batch_size, cfg.ppo_epochs), stats)


def cross_tokenizer_logp(run, cfg: Config, ro: Rollout, teacher_prompts: list[list[int]]) -> torch.Tensor:
    """The teacher's log-probs of each response's text, in its own tokenization after its own
    prompt, spread over the student's tokens (``xtok.spread``: each teacher token to the student
    token that completes its last character); (B, T) float32, 0 at padding, and each row sums to
    the teacher's log-prob of the row's text (EOS included when the student ended with one)."""
    ttok = run.teacher_tokenizer
    pad = ttok.pad_token_id if ttok.pad_token_id is not None else ttok.eos_token_id
    B, T = ro.response_ids.shape
    lengths = ro.response_mask.sum(-1).tolist()
    views = [run.xtok.teacher_view(ro.response_ids[b, : int(n)].tolist()) for b, n in enumerate(lengths)]
    width = max(1, max(len(v.ids) for v in views))
    r_ids = torch.full((B, width), pad, dtype=torch.long)
    r_mask = torch.zeros((B, width), dtype=torch.long)
    credit = torch.full((B, width), -1, dtype=torch.long)
    for b, v in enumerate(views):
        r_ids[b, : len(v.ids)] = torch.as_tensor(v.ids, dtype=torch.long)
        r_mask[b, : len(v.ids)] = 1
        credit[b, : len(v.ids)] = torch.as_tensor(v.credit, dtype=torch.long)
    p_ids, p_mask = data.collate_prompts(teacher_prompts, pad)
    zeros = torch.zeros((B, width))
    t_ro = Rollout(p_ids, p_mask, r_ids, r_mask, zeros, zeros, zeros)
    settings = (cfg.temperature, cfg.top_k, cfg.top_p)
    logp, _ = score(run.teacher, t_ro, settings, keep_hidden=False, chunk=cfg.chunk_rows, vocab=run.teacher_vocab_size)
    dev = ro.response_ids.device
    out = xtok.spread(logp.float().cpu(), credit, T)
    return out.where(ro.response_mask.bool().cpu(), torch.zeros(())).to(dev)


def recompute_logp(cfg: Config, precision: str) -> bool:
    """Whether to rescore the rollouts' behaviour log-probs (``recompute_logp``; auto: bf16/fp16)."""
    return cfg.recompute_logp == "always" or (cfg.recompute_logp == "auto" and precision in ("bf16", "fp16"))


def rescore_behaviour(student, ro: Rollout, cfg: Config, acc, vocab: int) -> Rollout:
    """The rollout with log q(y_t) from one teacher-forced, no-grad forward of the student (the
    same forward the loss runs, under the same autocast) and log p~ rebuilt from it, so that at
    the first PPO epoch rho = q_theta/p~ is w_t exactly, not up to the rounding difference between
    KV-cached decoding and a full forward. The tokens and log p are unchanged."""
    settings = (cfg.temperature, cfg.top_k, cfg.top_p)
    with acc.autocast():
        logq, _ = score(student, ro, settings, keep_hidden=False, chunk=cfg.chunk_rows, vocab=vocab)
    ro.student_logp = logq
    ro.mix_logp = adv.mixed_logp(ro.teacher_logp, logq, cfg.mix_alpha).where(ro.response_mask.bool(), torch.zeros(()))
    return ro


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts of different prompt/response widths (prompts left-, responses right-padded)."""
    P = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.response_ids.shape[1] for p in parts)

    def pad(x, width, value, left):
        extra = width - x.shape[1]
        if extra == 0:
            return x
        filler = torch.full((x.shape[0], extra, *x.shape[2:]), value, dtype=x.dtype, device=x.device)
        return torch.cat([filler, x] if left else [x, filler], dim=1)

    hidden = None
    if all(p.teacher_hidden is not None for p in parts):
        hidden = torch.cat([pad(p.teacher_hidden, T, 0.0, False) for p in parts])
    return Rollout(
        prompt_ids=torch.cat([pad(p.prompt_ids, P, pad_id, True) for p in parts]),
        prompt_mask=torch.cat([pad(p.prompt_mask, P, 0, True) for p in parts]),
        response_ids=torch.cat([pad(p.response_ids, T, pad_id, False) for p in parts]),
        response_mask=torch.cat([pad(p.response_mask, T, 0, False) for p in parts]),
        student_logp=torch.cat([pad(p.student_logp, T, 0.0, False) for p in parts]),
        mix_logp=torch.cat([pad(p.mix_logp, T, 0.0, False) for p in parts]),
        teacher_logp=torch.cat([pad(p.teacher_logp, T, 0.0, False) for p in parts]),
        teacher_hidden=hidden,
        ended=torch.cat([p.ended for p in parts]) if all(p.ended is not None for p in parts) else None,
    )


# ----------------------------------------------------------------------------------------------
# 2. the iteration: collect, then ppo_epochs passes in minibatches, then discard
# ----------------------------------------------------------------------------------------------


class RolloutSource:
    """The loop's batch source for MiniLLM: one micro-batch per ``next_batch``, walking
    ``minibatches`` (the iteration written out). Resumable at any micro-batch: ``state_dict``
    holds the buffer, the position (``iteration``, ``epoch``, ``position``), the prompt and
    corpus orders and the sampling generator."""

    def __init__(
        self,
        run,
        cfg: Config,
        student,
        prompts: list[list[int]],
        corpus: torch.Tensor | None,
        teacher_prompts: list[list[int]] | None = None,
    ):
        acc = run.accelerator
        self.run, self.cfg, self.student = run, cfg, student
        self.prompts = prompts
        self.teacher_prompts = teacher_prompts  # cross_tokenizer: the same prompts in the teacher's tokens
        self.per_process = max(cfg.batch_size, cfg.num_rollouts // acc.num_processes)
        self.prompt_order = ShuffledBatches(
            len(prompts),
            self.per_process,
            lambda idx: idx,
            seed=run.recipe.seed,
            rank=acc.process_index,
            world=acc.num_processes,
        )
        self.generator = torch.Generator(device=run.device).manual_seed(run.recipe.seed * 1000 + acc.process_index)
        self.corpus = None
        if corpus is not None:
            self.corpus = ShuffledBatches(
                len(corpus),
                cfg.lm_batch_size,
                lambda idx: corpus[idx],
                seed=run.recipe.seed + 1,
                rank=acc.process_index,
                world=acc.num_processes,
            )
        self.buffer: Buffer | None = None
        self.iteration = 0  # buffers collected so far
        self.epoch = 0  # PPO epoch over the current buffer
        self.position = 0  # rows of that epoch's order already handed out
        self._walk = None

    def minibatches_per_iteration(self) -> int:
        return self.cfg.ppo_epochs * math.ceil(self.per_process / self.cfg.batch_size)

    @property
    def stats(self) -> dict:
        return self.buffer.stats if self.buffer is not None else {}

    def minibatches(self):
        """The MiniLLM iteration. The position lives in ``self`` (not in the generator's frame),
        updated before each yield, so a fresh generator over a loaded ``state_dict`` continues
        exactly where the checkpointed one stood."""
        cfg = self.cfg
        while True:
            if self.buffer is None:
                self.collect()  # 1. sample a buffer with the current student
            while self.epoch < cfg.ppo_epochs:  # 2. ppo_epochs passes over it ...
                order = self.buffer.order[self.epoch]
                while self.position < len(order):  # ... in minibatches, never straddling two epochs
                    rows = order[self.position : self.position + cfg.batch_size]
                    self.position += len(rows)
                    yield self.minibatch(rows)
                self.epoch, self.position = self.epoch + 1, 0
            self.buffer = None  # 3. discard it: the next micro-batch samples again

    def collect(self) -> None:
        """Sample a fresh buffer (this process's share of the next prompts) and start its epoch 0."""
        run, cfg, acc = self.run, self.cfg, self.run.accelerator
        idx = self.prompt_order.next_batch()
        tp = [self.teacher_prompts[j] for j in idx] if self.teacher_prompts is not None else None
        self.buffer = collect_buffer(
            run, cfg, self.student, [self.prompts[j] for j in idx], self.generator, self.iteration, tp
        )
        self.iteration, self.epoch, self.position = self.iteration + 1, 0, 0
        if self.iteration == 1 and self.stats["eos_rate"] < 0.5 and acc.is_main_process:
            console.print(
                f"[yellow]stage '{cfg.name}': {100 * (1 - self.stats['eos_rate']):.0f}% of the first rollouts hit "
                f"max_new_tokens={cfg.max_new_tokens}: MiniLLM trains only the positions it samples, so it cannot learn "
                "where to stop beyond that limit (raise it if the teacher's answers are longer)[/]"
            )

    def minibatch(self, rows: torch.Tensor) -> dict:
        """The loss's micro-batch: the buffer's rows ``rows``, a corpus batch for L_PT, each loss
        term's count (``num_tokens``: response tokens; corpus tokens) and the buffer's statistics."""
        batch = self.buffer.minibatch(rows)
        batch["num_tokens"] = {"response": int(batch["response_mask"].sum())}
        if self.corpus is not None and self.cfg.lm_coef > 0:
            lm_ids = self.corpus.next_batch().to(self.run.device)
            batch["lm_ids"] = lm_ids
            batch["num_tokens"]["lm"] = lm_ids.shape[0] * (lm_ids.shape[1] - 1)  # next-token targets
        batch["stats"] = self.buffer.stats
        return batch

    def next_batch(self) -> dict:
        if self._walk is None:
            self._walk = self.minibatches()
        return next(self._walk)

    def state_dict(self) -> dict:
        buf = self.buffer
        return {
            "buffer": buf.tensors() if buf is not None else {},
            "order": buf.order if buf is not None else torch.zeros(0, dtype=torch.long),
            "epoch": self.epoch,
            "position": self.position,
            "iteration": self.iteration,
            "prompt_order": self.prompt_order.state_dict(),
            "generator": self.generator.get_state(),
            "corpus": self.corpus.state_dict() if self.corpus is not None else {},
            "stats": self.stats,
        }

    def load_state_dict(self, state: dict) -> None:
        tensors, order = dict(state["buffer"]), state["order"]
        if "step_weights" in tensors:  # checkpoints written before the rename
            tensors["single_step_weights"] = tensors.pop("step_weights")
        if "order_pos" in state:  # checkpoints written before the position was (epoch, position)
            rows = tensors["response_ids"].shape[0] if tensors else 1
            order = order.reshape(-1, rows) if tensors else order
            self.epoch, self.position = divmod(int(state["order_pos"]), rows)
        else:
            self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.buffer = Buffer.from_tensors(tensors, order, state["stats"]) if tensors else None
        self.iteration = int(state["iteration"])
        self.prompt_order.load_state_dict(state["prompt_order"])
        self.generator.set_state(state["generator"])
        if self.corpus is not None and state["corpus"]:
            self.corpus.load_state_dict(state["corpus"])
        self._walk = None  # the next batch starts a fresh walk from the loaded position


# ----------------------------------------------------------------------------------------------
# 3. the loss of one minibatch
# ----------------------------------------------------------------------------------------------


def response_logits(model, batch: dict, vocab: int) -> torch.Tensor:
    """Logits that predict each response token: (B, T, V), position P-1+t predicts y_t."""
    return fwd.response_logits(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"], vocab
    )


def teacher_response_logits(teacher, batch: dict, vocab: int) -> torch.Tensor:
    """The teacher's (B, T, V) response logits: from the hidden states the sampler kept (one LM
    head matmul) when there are any, else a teacher forward (``logits.response_logits``)."""
    with torch.no_grad():
        return fwd.response_logits(
            teacher,
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["response_ids"],
            batch["response_mask"],
            vocab,
            hidden=batch.get("teacher_hidden"),
        )


def _rows(batch: dict, rows: torch.Tensor, p0: int, t1: int) -> dict:
    """Rows ``rows`` of a minibatch without their all-padding prompt/response columns."""
    out = {}
    for k, v in batch.items():
        if k in ("prompt_ids", "prompt_mask"):
            out[k] = v[rows, p0:]
        elif k in RESPONSE_FIELDS or k in ("rewards", "returns", "advantages", "single_step_weights"):
            out[k] = v[rows, :t1]
    return out


def minillm_objective(model, batch: dict, *, cfg: Config, teacher, vocab: int) -> tuple[dict, dict]:
    """The loss terms of one micro-batch and its metrics: ``response``, the rollout loss summed
    over the minibatch's response tokens (``minillm_loss``), and with a corpus ``lm``, lm_coef *
    L_PT summed over the corpus batch's tokens. The loop divides each by its global count
    (``batch["num_tokens"]``), so the step minimises (pg + single-step) per response token
    + lm_coef * L_PT per corpus token."""
    response, metrics = minillm_loss(model, batch, cfg=cfg, teacher=teacher, vocab=vocab)
    terms = {"response": response}
    if "lm_ids" in batch:
        lm = pretrain_loss(model, teacher, batch["lm_ids"], cfg.kd_ratio, vocab)  # mean over this batch's tokens
        terms["lm"] = cfg.lm_coef * lm * batch["num_tokens"]["lm"]  # as a sum: the loop divides by the global count
        metrics["lm_loss"] = float(lm.detach())
    return terms, metrics


def minillm_loss(model, batch: dict, *, cfg: Config, teacher, vocab: int):
    """The rollout loss of a minibatch summed over its response tokens (long-term + single-step),
    and its metrics, with the buffer's rollout statistics (``batch["stats"]``). The policy forward
    runs in chunks of ``cfg.chunk_rows`` rows of similar prompt length (padding columns dropped);
    every term is a sum over tokens, so chunking changes nothing but the work.

    The stage trains the student without dropout (``models.train_mode(model, dropout=False)``,
    set by the loop for the whole step; base and LoRA dropout), as the official code keeps the
    policy in eval mode: the rollouts are sampled without dropout, so with it rho != 1 at the
    first PPO epoch, clipping fires on dropout noise, and the single-step and L_PT gradients are
    those of a perturbed policy."""
    loss, n_all, pg_all, ss_all, clipped, ratio_all = 0.0, 0, 0.0, 0.0, 0.0, 0.0
    for rows, p0, t1 in fwd.length_chunks(batch["prompt_mask"], batch["response_mask"], cfg.chunk_rows):
        mb = _rows(batch, rows, p0, t1)
        mask = mb["response_mask"]
        logits = response_logits(model, mb, vocab)  # (b, t1, V)
        fused = cfg.single_step and cfg.top_k == 0 and cfg.top_p >= 1.0
        if fused:  # one chunked pass gives log q(y_t) and the exact per-position KL
            t_logits = teacher_response_logits(teacher, mb, vocab)
            kl, logq = adv.reverse_kl_and_logp(logits, t_logits, mask, mb["response_ids"], temperature=cfg.temperature)
        else:
            logq = torch.log_softmax(process_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p), -1)
            logq = logq.gather(-1, mb["response_ids"][..., None]).squeeze(-1)  # (b, t1)
        logq = torch.where(mask.bool(), logq, torch.zeros_like(logq))

        pg_sum, n, clip_frac = adv.pg_loss(
            logq, mb["mix_logp"], mb["advantages"], mask, clip_eps=cfg.clip_eps if cfg.clip_eps else None
        )
        loss = loss + cfg.pg_coef * pg_sum
        n_all, pg_all, clipped = n_all + int(n), pg_all + float(pg_sum.detach()), clipped + float(clip_frac) * int(n)
        if cfg.single_step:
            weights = mb["single_step_weights"] if cfg.single_step_importance_weight else None
            if fused:
                if weights is not None:
                    kl = torch.where(mask.bool(), kl * weights.to(kl.dtype), torch.zeros_like(kl))
                ss_sum = kl.sum()
            else:
                # temperature, but not top-k/top-p, on both sides: truncation would make the KL infinite
                t_logits = teacher_response_logits(teacher, mb, vocab)
                ss_sum, _ = adv.single_step_kl(logits, t_logits, mask, weights=weights, temperature=cfg.temperature)
            loss = loss + ss_sum
            ss_all += float(ss_sum.detach())
        ratio_all += float((torch.exp((logq.detach() - mb["student_logp"]) * mask) * mask).sum())
    n = max(n_all, 1)
    metrics = {"pg_loss": pg_all / n, "clip_frac": clipped / n}
    if cfg.single_step:
        metrics["single_step_kl"] = ss_all / n
    metrics.update(batch["stats"])
    metrics["ratio_new_old"] = ratio_all / n
    return loss, metrics


def pretrain_loss(model, teacher, ids: torch.Tensor, kd_ratio: float, vocab: int) -> torch.Tensor:
    """L_PT on plain text: per-token mean of (1-kd_ratio)*CE + kd_ratio*KL(p||q) (one fused pass
    over the vocabulary for both terms, ``losses.forward_kl_and_ce``)."""
    logits = fwd.next_token_logits(model, ids, vocab=vocab)  # (B, L-1, V)
    labels, mask = ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool)
    if kd_ratio == 0:
        ce, count = losses.lm_loss(logits, labels, mask)
        return ce / count
    with torch.no_grad():
        t_logits = fwd.next_token_logits(teacher, ids, vocab=vocab)
    kd, ce, count = losses.forward_kl_and_ce(logits, t_logits, labels, mask)
    return ((1 - kd_ratio) * ce + kd_ratio * kd) / count


# ----------------------------------------------------------------------------------------------
# 4. validation and the stage
# ----------------------------------------------------------------------------------------------


def make_evaluate(run, cfg: Config, examples: list):
    acc = run.accelerator
    d = run.recipe.data
    mine = examples[: cfg.eval_examples][acc.process_index :: acc.num_processes]

    def evaluate(model) -> dict:
        res = {"n_examples": 0, "rougeL": 0.0, "mean_length": 0.0}  # a process with no share adds nothing
        if mine:
            with acc.autocast():
                res = evaluation.evaluate_instructions(
                    model,
                    run.tokenizer,
                    mine,
                    template=d.template,
                    seeds=[run.recipe.seed],
                    max_prompt_length=d.max_prompt_length,
                    max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                    batch_size=cfg.rollout_batch_size,
                    progress=False,
                    vocab_size=run.vocab_size,
                )
        n = torch.tensor(float(res["n_examples"]), device=acc.device)
        score = torch.tensor(res["rougeL"] * res["n_examples"], device=acc.device)
        length = torch.tensor(res["mean_length"] * res["n_examples"], device=acc.device)
        n, score, length = acc.reduce(n, "sum"), acc.reduce(score, "sum"), acc.reduce(length, "sum")
        return {"rougeL": float(score / n.clamp(min=1)), "mean_length": float(length / n.clamp(min=1))}

    return evaluate


def run(run, cfg: Config, student):
    d = run.recipe.data
    train_examples = run.instructions("train")
    prompts, _, stats = data.tokenize_prompts(
        train_examples,
        run.tokenizer,
        template=d.template,
        max_prompt_length=d.max_prompt_length,
        long_prompt=d.long_prompt,
    )
    teacher_prompts = None
    if cfg.cross_tokenizer:  # the same examples in the teacher's rendering and tokens
        t_prompts, _, t_stats = data.tokenize_prompts(
            train_examples,
            run.teacher_tokenizer,
            template=d.template,
            max_prompt_length=d.max_prompt_length,
            long_prompt=d.long_prompt,
        )
        by_index = dict(zip(t_stats.kept_indices, t_prompts))
        both = [k for k, i in enumerate(stats.kept_indices) if i in by_index]
        teacher_prompts = [by_index[stats.kept_indices[k]] for k in both]
        prompts = [prompts[k] for k in both]
    corpus = run.corpus()[0] if cfg.lm_coef > 0 else None  # L_PT text
    source = RolloutSource(run, cfg, student, prompts, corpus, teacher_prompts)
    if cfg.max_steps is not None:
        total = cfg.max_steps
    else:
        iters = max(1, math.ceil(cfg.epochs * len(prompts) / cfg.num_rollouts))
        total = max(1, iters * source.minibatches_per_iteration() // cfg.grad_accum)
    valid = run.instructions("valid")
    best_dir = run.stage_dir(cfg.name) / "best"

    def on_best(model):
        run.export(model, best_dir)

    def loss_fn(model, batch, step):
        return minillm_objective(model, batch, cfg=cfg, teacher=run.teacher, vocab=run.vocab_size)

    return train(
        run,
        cfg,
        student,
        source,
        loss_fn,
        total,
        evaluate=make_evaluate(run, cfg, valid) if valid else None,
        best_key="rougeL",
        best_mode="max",
        on_best=on_best,
        dropout=False,
    )


PLOTS = (  # the report's training curves
    Plot("loss", ["loss"], "Training loss (PG + single-step KL + L_PT)", "loss per response token"),
    Plot("kl", ["rkl_estimate", "mix_log_ratio", "single_step_kl"], "KL to the teacher on rollouts", "nats/token"),
    Plot("reward", ["reward"], "Reward log p(y_t) - log q(y_t)", "nats/token"),
    Plot("response_length", ["response_length", "valid/mean_length"], "Response length", "tokens"),
    Plot("clip_frac", ["clip_frac"], "PPO clip fraction", "fraction of tokens"),
    Plot("lm_loss", ["lm_loss"], "Pre-training loss L_PT", "nats/token"),
    Plot("valid_rougeL", ["valid/rougeL"], "Validation ROUGE-L", "ROUGE-L F (x100)"),
)


def cross_tokenizer(cfg) -> tuple[str, str]:
    """``Stage.cross_tokenizer``: ``cross_tokenizer: true`` asks for the span-spread reward."""
    if cfg.cross_tokenizer:
        return "token", ""
    return "", (
        "scores its rewards with the teacher's per-token log-probs over one vocabulary: set cross_tokenizer: true "
        "(with single_step: false, mix_alpha: 0, kd_ratio: 0)"
    )


STAGE = Stage(
    "minillm",
    Config,
    run,
    cross_tokenizer=cross_tokenizer,
    generates=True,
    needs_instructions=True,
    needs_corpus=lambda cfg: cfg.lm_coef > 0,
    plots=PLOTS,
)  # L_PT reads the corpus

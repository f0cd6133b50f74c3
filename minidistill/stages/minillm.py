"""MiniLLM: minimise the reverse KL, KL(q_student || p_teacher), over whole responses.

This file holds the stage's settings and wiring; the update itself is two short modules,
``minidistill/parts/rollouts.py`` (steps 1-2) and ``objectives.minillm_objective`` (step 3):

0. Settings: ``Config``; the named ``preset`` (``PRESETS``, below it) fills the fields left null
   (``Config.apply_preset``, called by validation); any field set in the recipe wins.
1. Collect (``rollouts.collect_buffer``): draw ``num_rollouts`` prompts, sample responses from the mixture
   p~ = a*p + (1-a)*q (``sampler.sample``; both models keep KV caches; a of this buffer:
   ``rollouts.mix_alpha_at``, linear from ``mix_alpha`` to ``mix_alpha_end``) recording per token
   log q (at sampling time), log p~ and log p. Rewards r_t = log p - log q come from those
   numbers (no second teacher pass); the return R (from the next token, or including the
   current one; discount gamma^(t'-t); divided by the number of *valid* remaining tokens) is
   turned into advantages (optionally whitened with statistics over valid tokens of every
   process). Padding never enters any of it (``advantages.py``, tested for it). The result is a
   ``Buffer``: the ``Rollout`` plus those per-token scores and each PPO epoch's row order.
2. Iterate (``rollouts.RolloutSource.minibatches``, the loop's batch source), written out as
       for each iteration: buffer = collect
           for epoch in range(ppo_epochs): for each minibatch of the epoch's order: one micro-batch
       then discard the buffer and sample again with the updated student.
   Its position (iteration, epoch, minibatch) is explicit state, checkpointed with the buffer
   and the RNGs, so a run killed anywhere resumes bitwise where it stopped.
3. The loss of one minibatch (``objectives.minillm_objective``), two terms the loop averages separately:
   ``response``, summed over response tokens (``objectives.minillm_loss``):
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
   With ``student_rows`` s > 0 (and a > 0) each buffer is split: its first round(s*B) prompts
   (the prompt order is shuffled) are sampled from the student alone (a = 0), the rest from the
   mixture. Only the student rows carry the long-term term (there rho = q_theta/q_old, the
   return is the student's own continuation value; advantages whitened over their tokens and
   scaled by B/|student rows| so the term keeps its expected weight); the single-step term uses
   every row (its importance weight is 1 on the student rows). With ``importance: exact`` the
   split estimator is exactly unbiased; with ``step`` only the single-step term on the mixed rows
   keeps the per-step bias (tests/unit/test_advantages.py enumerates both). Why: under mixing
   the other tokens' returns are computed on continuations drawn from p~, which look cheaper
   than the student's own, and that biases the update against EOS (docs/eos/README.md).
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

from minidistill.config import TrainConfig, opt
from minidistill.errors import UserError
from minidistill.parts import sources, validation
from minidistill.parts.objectives import minillm_objective
from minidistill.parts.rollouts import RolloutSource
from minidistill.reporting.tracking import console
from minidistill.stages import Plot, Stage
from minidistill.training.loop import train

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
    mix_alpha_end: float | None = opt(
        None,
        "Teacher share at the last rollout collection: a goes linearly from mix_alpha at the first to this "
        "at the last (null: mix_alpha, constant; paper/official). minidistill: 0, so the last buffers are the "
        "student's own and the long-term term loses the per-step weights' bias against EOS (docs/eos).",
        min=0.0,
        max=1.0,
    )
    student_rows: float | None = opt(
        None,
        "Share of each rollout buffer drawn from the student alone (a = 0), the rest from the mixture; "
        "only those rows carry the long-term (policy-gradient) term (rho = q_theta/q_old, advantages "
        "whitened over them and scaled by rows/student rows), the single-step term uses every row. "
        "Removes the bias of per-step weights against EOS under mixing (docs/eos). 0: every row from "
        "the mixture, in both terms (paper/official); no effect at mix_alpha 0.",
        min=0.0,
        max=1.0,
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
    rollout_engine: str = opt(
        "local",
        "Who draws the rollouts: local (the sampler, in this process) or vllm (a vLLM engine in its own environment, "
        "tools/setup-vllm.sh, synced with the student before every collection and checked on a probe; pure "
        "student sampling, mix_alpha 0). README, 'Served teacher and vLLM rollouts'.",
        choices=["local", "vllm"],
    )
    vllm_python: str | None = opt(
        None,
        "rollout_engine vllm: the vLLM environment's python (default $MINIDISTILL_VLLM_PYTHON, else .venv-vllm/bin/python).",
    )
    vllm_gpu_memory: float = opt(
        0.3,
        "rollout_engine vllm on a GPU: the share of the GPU's memory the engine takes (weights + KV cache); the "
        "trainer uses the rest.",
        gt=0.0,
        max=1.0,
    )
    vllm_check_tol: float | None = opt(
        None,
        "rollout_engine vllm: largest |engine - trainer| log-prob on the probe after a sync, in nats "
        "(default 1e-3 fp32, 0.25 bf16, 0.1 fp16).",
        gt=0.0,
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
    mask_truncated: bool | None = opt(
        None,
        "A response cut at max_new_tokens carries no long-term (policy-gradient) term: its tokens get "
        "advantage 0 and stay out of the whitening statistics, since what follows the cut is unobserved "
        "(as DAPO's overlong filtering); the single-step term still trains every position of it. On, "
        "bootstrap_truncated has nothing left to act on. Helps when rollouts are long enough to end in "
        "rambles, costs stopping when the limit cuts answers short (docs/eos); off in every preset.",
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
        "its token log-probs are spread over the student's tokens by character spans (minidistill.functional.xtok); "
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
        if self.rollout_engine == "vllm" and self.mix_alpha > 0:
            raise UserError(
                f"{where}.rollout_engine: the vLLM engine samples the student alone; teacher-mixed sampling "
                f"(mix_alpha {self.mix_alpha}) needs the teacher in lockstep: set mix_alpha: 0 or rollout_engine: local"
            )
        if (self.top_k > 0 or self.top_p < 1.0) and self.mix_alpha > 0:
            raise UserError(
                f"{where}.top_k/top_p: truncated sampling needs mix_alpha=0 (a token drawn from the teacher "
                f"can lie outside the student's kept set, where log q = -inf); got mix_alpha={self.mix_alpha}"
            )
        if self.mix_alpha_end is not None and self.mix_alpha_end > self.mix_alpha:
            raise UserError(
                f"{where}.mix_alpha_end: the teacher share decays from mix_alpha to mix_alpha_end; expected at most "
                f"mix_alpha ({self.mix_alpha}), got {self.mix_alpha_end}"
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
        "mask_truncated": False,
        "whiten": True,
        "reward_scale": 1.0,
        "single_step_importance_weight": True,
        "clip_eps": 0.2,
        "mix_alpha": 0.2,
        "mix_alpha_end": 0.0,
        "student_rows": 0.0,
    },
    "paper": {
        "include_current": False,
        "gamma": 1.0,
        "length_norm": True,
        "bootstrap_truncated": False,
        "mask_truncated": False,
        "whiten": False,
        "reward_scale": 1.0,
        "single_step_importance_weight": True,
        "clip_eps": 0.2,
        "mix_alpha": 0.2,
        "mix_alpha_end": None,
        "student_rows": 0.0,
    },
    "official": {
        "include_current": True,
        "gamma": 0.95,
        "length_norm": True,
        "bootstrap_truncated": False,
        "mask_truncated": False,
        "whiten": True,
        "reward_scale": 2.0,
        "single_step_importance_weight": False,
        "clip_eps": 0.2,
        "mix_alpha": 0.2,
        "mix_alpha_end": None,
        "student_rows": 0.0,
    },
}


def get_preset(name: str) -> dict[str, Any]:
    """A fresh copy of the named preset ("minidistill", "paper" or "official")."""
    if name not in PRESETS:
        raise UserError(f"unknown MiniLLM preset {name!r}: expected one of {sorted(PRESETS)}")
    return dict(PRESETS[name])


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------


def run(run, cfg: Config, student):
    prompts, kept = sources.prompts(run, "train")
    teacher_prompts = None
    if cfg.cross_tokenizer:  # the same examples in the teacher's rendering and tokens
        t_prompts, t_kept = sources.prompts(run, "train", teacher=True)
        by_index = dict(zip(t_kept, t_prompts))
        both = [k for k, i in enumerate(kept) if i in by_index]
        teacher_prompts = [by_index[kept[k]] for k in both]
        prompts = [prompts[k] for k in both]
    corpus = run.corpus()[0] if cfg.lm_coef > 0 else None  # L_PT text
    source = RolloutSource(run, cfg, student, prompts, corpus, teacher_prompts)
    if cfg.max_steps is not None:
        total = cfg.max_steps
    else:
        iters = max(1, math.ceil(cfg.epochs * len(prompts) / cfg.num_rollouts))
        total = max(1, iters * source.minibatches_per_iteration() // cfg.grad_accum)
    source.iterations = math.ceil(total * cfg.grad_accum / source.minibatches_per_iteration())  # for mix_alpha_end
    if (cfg.eval_max_new_tokens or 0) > cfg.max_new_tokens and run.accelerator.is_main_process:
        console.print(
            f"[yellow]stage '{cfg.name}': validation samples up to eval_max_new_tokens={cfg.eval_max_new_tokens} "
            f"new tokens, rollouts stop at max_new_tokens={cfg.max_new_tokens}: MiniLLM never trains the positions "
            "beyond the rollout limit, where a student decides to stop (docs/eos: keep the rollout limit at least "
            "the limit you evaluate at)[/]"
        )
    valid = run.instructions("valid")
    evaluate = validation.sampled_rouge(
        run,
        valid[: cfg.eval_examples],
        max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
        batch_size=cfg.rollout_batch_size,
    )
    try:
        return train(
            run,
            cfg,
            student,
            source,
            lambda model, batch, step: minillm_objective(
                model, batch, cfg=cfg, teacher=run.teacher, vocab=run.vocab_size
            ),
            total,
            evaluate=evaluate if valid else None,
            best_by=("rougeL", "max"),
            dropout=False,
        )
    finally:
        source.close()


PLOTS = (  # the report's training curves
    Plot("loss", ["loss"], "Training loss (PG + single-step KL + L_PT)", "loss per response token"),
    Plot("kl", ["rkl_estimate", "mix_log_ratio", "single_step_kl"], "KL to the teacher on rollouts", "nats/token"),
    Plot("reward", ["reward"], "Reward log p(y_t) - log q(y_t)", "nats/token"),
    Plot("response_length", ["response_length", "valid/mean_length"], "Response length", "tokens"),
    Plot(
        "stopping", ["eos_rate", "cut_rate", "repeat_rate"], "Rollouts that stop, are cut, repeat", "share of rollouts"
    ),
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


def served_teacher(cfg, logprobs: int) -> str:
    """``Stage.served_teacher``: a served teacher scores rollouts after sampling, at temperature 1."""
    if cfg.mix_alpha > 0:
        return (
            f"mix_alpha {cfg.mix_alpha}: teacher-mixed sampling draws tokens from a*p + (1-a)*q, which needs the "
            "teacher in lockstep with the sampler; set mix_alpha: 0"
        )
    if (cfg.temperature, cfg.top_k, cfg.top_p) != (1.0, 0, 1.0):
        return "temperature/top_k/top_p: a server scores the raw teacher distribution; use 1.0 / 0 / 1.0"
    return ""


STAGE = Stage(
    "minillm",
    Config,
    run,
    cross_tokenizer=cross_tokenizer,
    served_teacher=served_teacher,
    generates=True,
    needs_instructions=True,
    needs_corpus=lambda cfg: cfg.lm_coef > 0,
    plots=PLOTS,
)  # L_PT reads the corpus

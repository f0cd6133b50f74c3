"""MiniLLM's rollouts: collect a buffer (sample, score, advantages), then walk it for
``ppo_epochs`` in minibatches, then discard it and collect again -- the iteration the loop reads as
its batch source (``RolloutSource``), resumable at any micro-batch.

1. Collect (``collect_buffer``): draw ``num_rollouts`` prompts, sample responses from the mixture
   p~ = a*p + (1-a)*q (``sampler.sample``; the teacher runs in lockstep, ``Teacher.lockstep``;
   both models keep KV caches) recording per token log q (at sampling time), log p~ and log p.
   Rewards r_t = log p - log q come from those numbers (no second teacher pass); the return R
   (from the next token, or including the current one; discount gamma^(t'-t); divided by the
   number of *valid* remaining tokens) is turned into advantages (optionally whitened with
   statistics over valid tokens of every process). Padding never enters any of it
   (``advantages.py``, tested for it). The result is a ``Buffer``: the ``Rollout`` plus those
   per-token scores and each PPO epoch's row order. With ``student_rows`` the buffer is split:
   its first rows are sampled at a = 0 (``Rollout.mixed`` False), the only rows whose advantages
   are not 0 (``advantages_for``); the flags are checkpointed with the buffer.
2. Iterate (``RolloutSource.minibatches``), written out as
       for each iteration: buffer = collect
           for epoch in range(ppo_epochs): for each minibatch of the epoch's order: one micro-batch
       then discard the buffer and sample again with the updated student.
   Its position (iteration, epoch, minibatch) is explicit state, checkpointed with the buffer
   and the RNGs, so a run killed anywhere resumes bitwise where it stopped.

The loss of a minibatch is ``objectives.minillm_objective``; the settings (``cfg``) are the
minillm stage's ``Config``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from minidistill import data
from minidistill.functional import advantages as adv
from minidistill.functional import stopping
from minidistill.generation.sampler import Rollout, sample, score
from minidistill.reporting.tracking import console
from minidistill.training.batches import ShuffledBatches

# ---- 1. collect: rollouts -> advantages -> a buffer ----------------------------------------

REPEAT_N = 4  # repeat_rate: a response repeats when some n-gram of this length occurs twice


def mix_alpha_at(cfg, iteration: int, iterations: int) -> float:
    """The teacher share a of collection ``iteration`` (0-based) of ``iterations``: linear from
    ``mix_alpha`` at the first to ``mix_alpha_end`` at the last (None: constant ``mix_alpha``).
    Every quantity of a buffer (its samples, log p~, importance weights, statistics) uses its own a."""
    end = cfg.mix_alpha_end
    if end is None or iterations <= 1:
        return cfg.mix_alpha
    frac = min(max(iteration, 0), iterations - 1) / (iterations - 1)
    return cfg.mix_alpha + (end - cfg.mix_alpha) * frac


def student_row_count(cfg, rows: int) -> int:
    """How many of a buffer's ``rows`` are drawn from the student alone (``student_rows``): the
    share rounded half up, at least 1 when the share is > 0; 0 when the buffer is not split
    (share 0, or mix_alpha 0, where every row already is a student row)."""
    share = cfg.student_rows or 0.0
    if share <= 0 or cfg.mix_alpha <= 0 or rows == 0:
        return 0
    return min(rows, max(1, math.floor(share * rows + 0.5)))


def long_term_rows(ro: Rollout) -> torch.Tensor | None:
    """(B,) bool: the rows that carry the long-term term, those drawn from the student alone in a
    split buffer (``Rollout.mixed`` False); None: every row (a buffer that is not split)."""
    return None if ro.mixed is None else ~ro.mixed.bool().to(ro.response_mask.device)


def advantages_for(cfg, ro: Rollout, reduce_sum=lambda t: t) -> dict:
    """Rewards, returns and advantages for a rollout buffer (pure, given the global reduce).

    A split buffer (``student_rows``; ``Rollout.mixed`` set): the advantages are those of the rows
    drawn from the student alone (whitened with statistics over their valid tokens), 0 on the rows
    drawn from the mixture, and multiplied by (all rows) / (student rows), all processes together,
    so that the long-term term keeps its expected weight against the single-step term, which every
    row carries. ``mask_truncated``: the rows cut at the token limit (``Rollout.ended`` False) also
    get advantage 0 and stay out of the whitening statistics (the factor above is unchanged: it
    counts the rows drawn from the student, cut or not). Rewards and returns are computed on every
    row (the statistics log them)."""
    mask = ro.response_mask
    carry = long_term_rows(ro)  # (B,) or None
    rows = carry
    if cfg.mask_truncated:
        if ro.ended is None:
            raise RuntimeError("mask_truncated needs Rollout.ended (which rows stopped on EOS)")
        finished = ro.ended.bool().to(mask.device)
        rows = finished if carry is None else carry & finished
    lt_mask = mask if rows is None else mask * rows[:, None].to(mask.dtype)  # (B, T)
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
        stats = tuple(reduce_sum(s) for s in adv.masked_moments(R, lt_mask))
        A = adv.whiten(R, lt_mask, stats=stats)
    if rows is not None:  # the long-term term on the rows that carry it only
        scale = 1.0
        if carry is not None:  # a split buffer: the student's own rows, at the term's full weight
            counts = reduce_sum(torch.tensor([float(carry.numel()), float(carry.sum())], dtype=torch.float64))
            scale = float(counts[0]) / float(counts[1]) if float(counts[1]) > 0 else 0.0
        A = torch.where(lt_mask.bool(), A * scale, torch.zeros((), dtype=A.dtype, device=A.device))
    if cfg.importance == "exact":  # pg_loss's rho = q/p~ supplies w_t; this is the rest of the sequence's product
        A = A * adv.sequence_importance_weights(ro.student_logp, ro.mix_logp, mask).long_term
    w = adv.single_step_weights(ro.student_logp, ro.mix_logp, mask, cfg.importance)
    return {"rewards": r, "returns": R, "advantages": A, "single_step_weights": w}


def rollout_stats(
    buf: dict,
    eos_id: int,
    reduce_sum=lambda t: t,
    mix_alpha: float = 0.0,
    max_new_tokens: int | None = None,
    repeat_n: int = REPEAT_N,
) -> dict:
    """Mean reward, response length and the stopping statistics over the rollouts of every process
    (sums and counts go through ``reduce_sum``), and the mean of log q(y_t) - log p(y_t) over the
    sampled tokens: with pure student sampling (a = 0) that is a Monte Carlo estimate of the
    student's per-token reverse KL on its own samples (``rkl_estimate``); with a > 0 the tokens
    come from the mixture and the same mean is no estimate of the student's KL (teacher-drawn
    tokens pull it down), so it is logged as ``mix_log_ratio``.

    Stopping (``functional.stopping``; shares of rollouts): ``eos_rate`` (ended with EOS),
    ``cut_rate`` (reached ``max_new_tokens`` without EOS; None: every row that did not stop) and
    ``repeat_rate`` (some ``repeat_n``-gram, default 4, occurs twice or more in the response).
    ``mix_alpha``: the teacher share a the buffer was sampled with."""
    m = buf["response_mask"].float()
    lengths = m.sum(-1)
    if buf.get("ended") is not None:
        stopped = buf["ended"].bool().to(m.device)
    else:
        stopped = stopping.stopped_rows(buf["response_ids"], buf["response_mask"], eos_id)
    cut = stopping.cut_rows(buf["response_mask"], stopped, max_new_tokens)
    repeat = stopping.repeated_ngram_rows(buf["response_ids"], buf["response_mask"], repeat_n)
    sums = torch.stack(
        [
            (buf["rewards"] * m).sum(),
            ((buf["student_logp"] - buf["teacher_logp"]) * m).sum(),
            lengths.sum(),
            stopped.float().sum(),
            cut.float().sum(),
            repeat.float().sum(),
            torch.tensor(float(m.shape[0]), device=m.device),
        ]
    ).to(torch.float64)
    reward, log_ratio, tokens, n_eos, n_cut, n_repeat, rows = reduce_sum(sums).tolist()
    out = {
        "reward": reward / max(tokens, 1.0),
        ("rkl_estimate" if mix_alpha == 0 else "mix_log_ratio"): log_ratio / max(tokens, 1.0),
        "response_length": tokens / max(rows, 1.0),
        "eos_rate": n_eos / max(rows, 1.0),
        "cut_rate": n_cut / max(rows, 1.0),
        "repeat_rate": n_repeat / max(rows, 1.0),
        "mix_alpha": float(mix_alpha),  # this buffer's teacher share (``mix_alpha_end`` schedules it)
    }
    if buf.get("mixed") is not None and mix_alpha > 0:  # a split buffer: its student rows are on-policy
        own = ~buf["mixed"].bool().to(m.device)  # (B,)
        mo = m * own[:, None].to(m.dtype)
        sums = torch.stack(
            [((buf["student_logp"] - buf["teacher_logp"]) * mo).sum(), mo.sum(), (stopped & own).float().sum()]
        ).to(torch.float64)
        own_sums = torch.cat([sums, own.float().sum()[None].to(torch.float64)])
        log_ratio, tokens, n_eos, rows = reduce_sum(own_sums).tolist()
        out["rkl_estimate"] = log_ratio / max(tokens, 1.0)  # the student's own samples: an estimate of its KL
        out["student_eos_rate"] = n_eos / max(rows, 1.0)
    return out


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


def engine_rollout(run, cfg, student, engine, prompts: list[list[int]], iteration: int) -> tuple[Rollout, dict]:
    """The student's responses to ``prompts`` drawn by the vLLM engine (``vllm_engine``) after a
    weight sync checked on a probe; tokens only (every log-prob is left at 0 for the trainer's own
    forwards to fill). Seeds per row from (seed, iteration, row). Returns it and the engine's timings."""
    engine.sync(student)
    gap = engine.verify(student, prompts)
    seeds = [(run.recipe.seed * 1_000_003 + iteration * 10_007 + i) % (2**31) for i in range(len(prompts))]
    rows = engine.generate(
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seeds=seeds,
        eos_token_id=run.tokenizer.eos_token_id,
    )
    pad = run.tokenizer.pad_token_id
    p_ids, p_mask = data.collate_prompts(prompts, pad)
    T = max(1, max(len(r) for r, _ in rows))
    r_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    r_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (r, _) in enumerate(rows):
        r_ids[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        r_mask[b, : len(r)] = 1
    ended = torch.tensor([reason == "stop" for _, reason in rows])
    z = torch.zeros((len(rows), T))
    dev = run.device
    ro = Rollout(p_ids.to(dev), p_mask.to(dev), r_ids.to(dev), r_mask.to(dev), z.to(dev), z.to(dev), z.to(dev))
    ro.ended = ended.to(dev)
    timings = {
        "engine_sync_s": engine.timings["sync_s"][-1],
        "engine_generate_s": engine.timings["generate_s"][-1],
        "engine_check_gap": gap,
    }
    return ro, timings


def collect_buffer(
    run,
    cfg,
    student,
    prompts: list[list[int]],
    generator: torch.Generator,
    iteration: int,
    teacher_prompts: list[list[int]] | None = None,
    engine=None,
) -> Buffer:
    """Sample responses to ``prompts`` with the current student, score them, compute advantages.
    ``teacher_prompts`` (cross_tokenizer): the same prompts in the teacher's tokenization, which
    then scores the responses' text (``Teacher.response_logp``). ``engine``: a vLLM engine draws the
    tokens (``engine_rollout``); the student's and the teacher's log-probs then come from one
    teacher-forced pass each here. Runs under the loop's autocast (the loop draws batches under it)."""
    acc, teacher = run.accelerator, run.teacher
    settings = (cfg.temperature, cfg.top_k, cfg.top_p)
    parts, scoring, timings = [], [], {}
    keep_topk = cfg.single_step and not cfg.cross_tokenizer
    if engine is not None:
        ro, timings = engine_rollout(run, cfg, student, engine, prompts, iteration)
        parts.append(ro)
        if teacher.served:
            scoring.append(
                teacher.response_logp_async(ro, settings, teacher_prompts=teacher_prompts, keep_topk=keep_topk)
            )
        elif not cfg.cross_tokenizer:
            ro.teacher_logp, ro.teacher_hidden = teacher.response_logp(
                ro, settings, chunk=cfg.chunk_rows, keep_hidden=cfg.single_step
            )
    # without an engine our sampler draws them, batch by batch; student_rows: the first k prompts
    # (the order is shuffled) are drawn from the student alone (k is 0 at mix_alpha 0, the engine's case)
    k = student_row_count(cfg, len(prompts))
    spans = ((0, k, 0.0), (k, len(prompts), cfg.mix_alpha)) if engine is None else ()
    batches = [
        (i, min(i + cfg.rollout_batch_size, hi), alpha)
        for lo, hi, alpha in spans
        for i in range(lo, hi, cfg.rollout_batch_size)
    ]
    for i, j, alpha in batches:
        ids, mask = data.collate_prompts(prompts[i:j], run.tokenizer.pad_token_id)
        parts.append(
            sample(
                student,
                None if cfg.cross_tokenizer else teacher.lockstep(),
                ids,
                mask,
                max_new_tokens=cfg.max_new_tokens,
                mix_alpha=alpha,
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
        if k > 0:
            parts[-1].mixed = torch.full((j - i,), alpha > 0, dtype=torch.bool, device=parts[-1].response_ids.device)
        if teacher.served:  # the server scores this batch while the next one is sampled
            tp = teacher_prompts[i:j] if teacher_prompts is not None else None
            scoring.append(teacher.response_logp_async(parts[-1], settings, teacher_prompts=tp, keep_topk=keep_topk))
    for part, answer in zip(parts, scoring):
        part.teacher_logp, part.teacher_topk_ids, part.teacher_topk_logp = answer.result()
    ro = concat_rollouts(parts, run.tokenizer.pad_token_id)
    if cfg.cross_tokenizer and not teacher.served:  # the teacher scores the text in its own tokens
        ro.teacher_logp, _ = run.teacher.response_logp(
            ro, settings, chunk=cfg.chunk_rows, teacher_prompts=teacher_prompts
        )
    if engine is not None or recompute_logp(cfg, run.precision):  # the engine's tokens: log q from our forward
        ro = rescore_behaviour(student, ro, cfg, run.vocab_size)
    reduce_sum = lambda t: acc.reduce(t.to(acc.device), "sum")  # noqa: E731
    scores = advantages_for(cfg, ro, reduce_sum=reduce_sum)
    stats = rollout_stats(
        {**rollout_tensors(ro), **scores},
        run.tokenizer.eos_token_id,
        reduce_sum=reduce_sum,
        mix_alpha=cfg.mix_alpha,
        max_new_tokens=cfg.max_new_tokens,
    )
    stats.update(timings)
    return Buffer(ro, scores, epoch_orders(run.recipe.seed, iteration, ro.batch_size, cfg.ppo_epochs), stats)


def start_engine(run, cfg, student, prompts: list[list[int]]):
    """The vLLM engine of a minillm stage (``vllm_engine.Engine``), over the student as it is now."""
    from minidistill.generation import vllm_engine

    longest = max(len(p) for p in prompts) if prompts else 0
    engine = vllm_engine.Engine(
        vllm_engine.find_python(cfg.vllm_python),
        precision=run.precision,
        max_model_len=longest + max(cfg.max_new_tokens, 8) + 1,
        seed=run.recipe.seed,
        check_tol=cfg.vllm_check_tol,
        gpu_memory=cfg.vllm_gpu_memory,
    )
    engine.start(student, run.tokenizer)
    console.print(f"stage '{cfg.name}': vLLM rollout engine ready in {engine.timings['start_s']:.1f} s")
    return engine


def recompute_logp(cfg, precision: str) -> bool:
    """Whether to rescore the rollouts' behaviour log-probs (``recompute_logp``; auto: bf16/fp16)."""
    return cfg.recompute_logp == "always" or (cfg.recompute_logp == "auto" and precision in ("bf16", "fp16"))


def rescore_behaviour(student, ro: Rollout, cfg, vocab: int) -> Rollout:
    """The rollout with log q(y_t) from one teacher-forced, no-grad forward of the student (the
    same forward the loss runs, under the same autocast) and log p~ rebuilt from it, so that at
    the first PPO epoch rho = q_theta/p~ is w_t exactly, not up to the rounding difference between
    KV-cached decoding and a full forward. The tokens and log p are unchanged."""
    settings = (cfg.temperature, cfg.top_k, cfg.top_p)
    logq, _ = score(student, ro, settings, keep_hidden=False, chunk=cfg.chunk_rows, vocab=vocab)
    ro.student_logp = logq
    mix = adv.mixed_logp(ro.teacher_logp, logq, cfg.mix_alpha)
    if ro.mixed is not None:  # a split buffer's student rows were drawn at a = 0: log p~ = log q there
        mix = torch.where(ro.mixed.bool()[:, None], mix, logq)
    ro.mix_logp = mix.where(ro.response_mask.bool(), torch.zeros(()))
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

    hidden = topk_ids = topk_logp = None
    if all(p.teacher_hidden is not None for p in parts):
        hidden = torch.cat([pad(p.teacher_hidden, T, 0.0, False) for p in parts])
    if all(p.teacher_topk_ids is not None for p in parts):
        topk_ids = torch.cat([pad(p.teacher_topk_ids, T, 0, False) for p in parts])
        topk_logp = torch.cat([pad(p.teacher_topk_logp, T, float("-inf"), False) for p in parts])
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
        teacher_topk_ids=topk_ids,
        teacher_topk_logp=topk_logp,
        mixed=torch.cat([p.mixed for p in parts]) if all(p.mixed is not None for p in parts) else None,
    )


# ---- 2. the iteration: collect, then ppo_epochs passes in minibatches, then discard ----------


class RolloutSource:
    """The loop's batch source for MiniLLM: one micro-batch per ``next_batch``, walking
    ``minibatches`` (the iteration written out). Resumable at any micro-batch: ``state_dict``
    holds the buffer, the position (``iteration``, ``epoch``, ``position``), the prompt and
    corpus orders and the sampling generator."""

    def __init__(
        self,
        run,
        cfg,
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
        self.engine = None  # the vLLM engine (rollout_engine: vllm), started at the first collection
        self.iteration = 0  # buffers collected so far
        self.iterations = 1  # buffers the stage will collect (the stage sets it; mix_alpha_end's schedule)
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
        if cfg.rollout_engine == "vllm" and self.engine is None:
            self.engine = start_engine(run, cfg, self.student, self.prompts)
        at = dataclasses.replace(cfg, mix_alpha=mix_alpha_at(cfg, self.iteration, self.iterations))
        self.buffer = collect_buffer(
            run, at, self.student, [self.prompts[j] for j in idx], self.generator, self.iteration, tp, self.engine
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

    def close(self) -> None:
        """Stop the vLLM engine, if one was started."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

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

"""The loss terms of every stage, each a sum over its own units that the loop divides by their
global count (``loop.py``): the student's forward, the teacher through ``teacher.Teacher``, the
math in ``losses`` / ``advantages`` / ``xtok`` (pure tensor functions tested against closed forms).

- ``ce_sum``: cross-entropy of the gold tokens (SFT);
- ``ce_and_divergence``: CE + a token-level divergence to the teacher's distribution at the same
  positions, one fused pass over the vocabulary (KD, SeqKD+KD, PD online/offline);
- ``pair_divergence``: across tokenizers, the ULD / hybrid divergence at paired positions (KD, PD);
- ``mix``: (1 - r) * CE + r * KD, the mix KD, PD and MiniLLM's L_PT share;
- ``minillm_objective``: MiniLLM's rollout loss (PPO-clipped long-term term + the exact
  single-step reverse KL) and L_PT.
"""

from __future__ import annotations

import torch

from minidistill.functional import advantages as adv
from minidistill.functional import losses, xtok
from minidistill.functional.losses import Truncated
from minidistill.generation.sampler import RESPONSE_FIELDS, process_logits
from minidistill.models import logits as fwd
from minidistill.models.logit_store import truncate_raw
from minidistill.teacher import as_teacher

# ---- token-level terms ------------------------------------------------------------------------


def next_logits(model, batch: dict, vocab: int | None = None) -> torch.Tensor:
    """(B, T-1, V): position t predicts token t+1 of the batch's input_ids (``logits.next_token_logits``)."""
    return fwd.next_token_logits(model, batch["input_ids"], batch.get("attention_mask"), vocab=vocab)


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy; ``labels`` aligned with ``logits``, -100 = ignored."""
    return losses.lm_loss(logits, labels, labels != -100)[0]


def mix(ce: torch.Tensor, kd: torch.Tensor, ratio: float) -> torch.Tensor:
    """(1 - ratio) * CE + ratio * KD (KD alone at ratio 1: no backward through the CE)."""
    return kd if ratio == 1 else (1 - ratio) * ce + ratio * kd


def ce_and_divergence(logits, target, labels, mask, kind: str, cfg, *, vocab: int | None = None, chunk_size=1024):
    """``losses.ce_and_divergence`` with a stage's divergence settings (temperature,
    student_temperature, skew, beta read from ``cfg``): (ce_sum, divergence_sum, student_kept)."""
    return losses.ce_and_divergence(
        logits,
        target,
        labels,
        mask,
        kind,
        vocab=vocab,
        temperature=cfg.temperature,
        student_temperature=cfg.student_temperature,
        skew=cfg.skew,
        beta=cfg.beta,
        chunk_size=chunk_size,
    )


def kd_terms(model, teacher, batch: dict, cfg, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CE sum over response tokens, divergence sum over them or None when kd_ratio == 0) on
    teacher-forced instruction rows; the teacher sees the same ids (``Teacher.logits``). CE over the
    student's whole head, the divergence over the first ``vocab`` logits; with kd_ratio 1 the CE is
    detached (logged only)."""
    logits = next_logits(model, batch)  # (B, T-1, Vs)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    if cfg.kd_ratio == 0:
        return ce_sum(logits, labels), None
    t_logits = as_teacher(teacher).logits(batch["input_ids"], batch["attention_mask"])  # (B, T-1, Vt) or Truncated
    if isinstance(t_logits, Truncated):  # a served teacher's top-k
        v = vocab if vocab is not None else logits.shape[-1]
    else:
        v = vocab if vocab is not None else min(logits.shape[-1], t_logits.shape[-1])
    r = ce_and_divergence(logits, t_logits, labels, labels != -100, cfg.kind, cfg, vocab=v)
    return (r.ce if cfg.kd_ratio < 1 else r.ce.detach()), r.divergence


def pair_divergence(
    teacher,
    logits: torch.Tensor,
    side: dict,
    kind: str,
    cfg,
    *,
    vocab: int | None = None,
    top_k: int = 0,
    truncate: bool = False,
) -> torch.Tensor:
    """Sum over a batch's paired positions (``side``: ``Teacher.side_of_rows`` / ``side_of_blocks``)
    of the cross-tokenizer divergence (``xtok.divergence_sum``) between the student's logits (the
    rows of ``logits`` (B, L-1, Vs) at ``pairs_s``, first ``vocab`` logits) and the teacher's at ``pairs_t``. ``truncate``:
    against the top-p-k truncated teacher target (PD's ``top_p``/``top_k``), else the full one."""
    rows = logits.reshape(-1, logits.shape[-1])[side["pairs_s"], :vocab]  # (M, Vs)
    raw = teacher.pair_logits(side)

    def target(a: int, b: int) -> torch.Tensor:  # (n, Vt) raw log-probs, -inf outside the kept set
        z = raw(a, b)
        if not truncate:
            return z
        tr = truncate_raw(z, cfg.top_p, cfg.top_k)
        dense = torch.full(z.shape, float("-inf"), dtype=torch.float32, device=z.device)
        return dense.scatter_reduce(-1, tr.indices.long(), tr.logprobs.float(), reduce="amax")

    return xtok.divergence_sum(
        rows,
        target if truncate else raw,
        kind,
        shared=teacher.shared(),
        temperature=cfg.temperature,
        student_temperature=cfg.student_temperature,
        top_k=top_k,
        matched_weight=cfg.uld_matched_weight,
        unmatched_weight=cfg.uld_unmatched_weight,
    )


def kept_mass(target: Truncated) -> torch.Tensor:
    """The teacher's probability inside a truncated target's kept set (raw tau = 1 log-probs)."""
    return target.logprobs.float().logsumexp(-1).exp().mean()


# ---- MiniLLM ------------------------------------------------------------------------------------


def response_logits(model, batch: dict, vocab: int) -> torch.Tensor:
    """Logits that predict each response token: (B, T, V), position P-1+t predicts y_t."""
    return fwd.response_logits(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"], vocab
    )


def _rows(batch: dict, rows: torch.Tensor, p0: int, t1: int) -> dict:
    """Rows ``rows`` of a minibatch without their all-padding prompt/response columns."""
    out = {}
    for k, v in batch.items():
        if v is None:
            continue
        if k in ("prompt_ids", "prompt_mask"):
            out[k] = v[rows, p0:]
        elif k in RESPONSE_FIELDS or k in ("rewards", "returns", "advantages", "single_step_weights"):
            out[k] = v[rows, :t1]
    return out


def minillm_objective(model, batch: dict, *, cfg, teacher, vocab: int) -> tuple[dict, dict]:
    """The loss terms of one MiniLLM micro-batch and its metrics: ``response``, the rollout loss
    summed over the minibatch's response tokens (``minillm_loss``), and with a corpus ``lm``,
    lm_coef * L_PT summed over the corpus batch's tokens. The loop divides each by its global
    count (``batch["num_tokens"]``), so the step minimises (pg + single-step) per response token
    + lm_coef * L_PT per corpus token."""
    response, metrics = minillm_loss(model, batch, cfg=cfg, teacher=teacher, vocab=vocab)
    terms = {"response": response}
    if "lm_ids" in batch:
        lm = pretrain_loss(model, teacher, batch["lm_ids"], cfg.kd_ratio, vocab)  # mean over this batch's tokens
        terms["lm"] = cfg.lm_coef * lm * batch["num_tokens"]["lm"]  # as a sum: the loop divides by the global count
        metrics["lm_loss"] = float(lm.detach())
    return terms, metrics


def minillm_loss(model, batch: dict, *, cfg, teacher, vocab: int):
    """The rollout loss of a minibatch summed over its response tokens and its metrics (with the
    buffer's rollout statistics, ``batch["stats"]``):

        long-term    -min(rho*A, clip(rho, 1-eps, 1+eps)*A),  rho = q_theta(y_t) / p~(y_t)
      + single-step  KL(q_theta(.|y_<t) || p(.|y_<t)) over the whole vocabulary, exact, optionally
                     times its importance weight (``advantages.single_step_weights``).

    The teacher's logits for the single-step term come from the hidden states the sampler kept
    (``Teacher.response_logits``: one LM-head matmul, no teacher forward). The policy forward runs
    in chunks of ``cfg.chunk_rows`` rows of similar prompt length (padding columns dropped); every
    term is a sum over tokens, so chunking changes nothing but the work. The stage trains without
    dropout (the loop's ``dropout=False``), as the official code keeps the policy in eval mode:
    the rollouts are sampled without dropout, so with it rho != 1 at the first PPO epoch."""
    teacher = as_teacher(teacher)
    loss, n_all, pg_all, ss_all, clipped, ratio_all = 0.0, 0, 0.0, 0.0, 0.0, 0.0
    for rows, p0, t1 in fwd.length_chunks(batch["prompt_mask"], batch["response_mask"], cfg.chunk_rows):
        mb = _rows(batch, rows, p0, t1)
        mask = mb["response_mask"]
        logits = response_logits(model, mb, vocab)  # (b, t1, V)
        fused = cfg.single_step and cfg.top_k == 0 and cfg.top_p >= 1.0
        if fused:  # one chunked pass gives log q(y_t) and the exact per-position KL
            t_logits = teacher.response_logits(mb, vocab)
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
                t_logits = teacher.response_logits(mb, vocab)
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
    """L_PT on plain text: per-token mean of ``mix(CE, KL(p||q), kd_ratio)`` (one fused pass over
    the vocabulary for both terms, ``losses.forward_kl_and_ce``; against a served teacher's top-k,
    the truncated forward KL of ``losses.ce_and_divergence``)."""
    logits = fwd.next_token_logits(model, ids, vocab=vocab)  # (B, L-1, V)
    labels, mask = ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool)
    if kd_ratio == 0:
        ce, count = losses.lm_loss(logits, labels, mask)
        return ce / count
    t_logits = as_teacher(teacher).logits(ids, vocab=vocab)
    if isinstance(t_logits, Truncated):
        r = losses.ce_and_divergence(logits, t_logits, labels, mask, "fkl", vocab=vocab)
        kd, ce, count = r.divergence, r.ce, r.count
    else:
        kd, ce, count = losses.forward_kl_and_ce(logits, t_logits, labels, mask)
    return mix(ce, kd, kd_ratio) / count

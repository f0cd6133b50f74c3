"""Custom autograd kernels behind the fused losses (``losses.ce_and_divergence``,
``advantages.reverse_kl_and_logp``): per-row divergences over a full vocabulary, chunked over rows
and recomputed in backward instead of saved, so no (N, V) float32 tensor outlives one chunk.

The pure, documented entry points live in :mod:`minidistill.losses` and
:mod:`minidistill.advantages`; these Functions take flat (N, V) rows and are not meant to be
called directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["RowForwardKLCE", "RowReverseKL", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


class RowForwardKLCE(torch.autograd.Function):
    """Per row of (N, V) logits: KL(softmax(t) || softmax(s)) and -log softmax(s)[target], chunked
    over rows and recomputed in backward (nothing full-vocabulary is saved; one chunk of float32
    temporaries is alive at a time). d/ds: g_kl * (q - p) + g_ce * (q - onehot(y))."""

    @staticmethod
    def _chunk(student, teacher, a: int, chunk: int, dt):
        ls = F.log_softmax(student[a : a + chunk].to(dt), -1)  # (C, V)
        lt = F.log_softmax(teacher[a : a + chunk].to(dt), -1)
        return ls, lt

    @staticmethod
    def forward(ctx, student, teacher, targets, chunk: int):
        dt = torch.promote_types(student.dtype, torch.float32)
        N = student.shape[0]
        kl = torch.zeros(N, dtype=dt, device=student.device)
        ce = torch.zeros(N, dtype=dt, device=student.device)
        for a in range(0, N, chunk):
            ls, lt = RowForwardKLCE._chunk(student, teacher, a, chunk, dt)
            ce[a : a + chunk] = -ls.gather(-1, targets[a : a + chunk, None])[:, 0]
            p = lt.exp()
            kl[a : a + chunk] = (p * torch.where(p > 0, lt.sub_(ls), 0.0)).sum(-1)  # 0 log 0 = 0
        ctx.save_for_backward(student, teacher, targets)
        ctx.chunk = chunk
        return kl, ce

    @staticmethod
    def backward(ctx, g_kl, g_ce):  # autograd materialises unused output grads as zeros
        student, teacher, targets = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        dt = torch.promote_types(student.dtype, torch.float32)
        grad = torch.empty_like(student)
        for a in range(0, student.shape[0], ctx.chunk):
            rows = slice(a, a + ctx.chunk)
            ls, lt = RowForwardKLCE._chunk(student, teacher, a, ctx.chunk, dt)
            gk, gc = g_kl[rows, None].to(dt), g_ce[rows, None].to(dt)  # (C, 1)
            g = ls.exp_().mul_(gk + gc)  # (g_kl + g_ce) * q, in place on the chunk's log q
            g.sub_(lt.exp_().mul_(gk))  # - g_kl * p
            g.scatter_add_(-1, targets[rows, None], -gc)  # - g_ce at the target
            grad[rows] = g.to(grad.dtype)
        return grad, None, None, None


class RowReverseKL(torch.autograd.Function):
    """Per row of (N, V) logits: KL(softmax(s/T) || softmax(t/T)) and, optionally, the student's
    log-softmax at a target index; chunked over rows, recomputed in backward.

    Only one chunk of full-vocabulary compute-dtype tensors is alive at a time, in forward and in
    backward; nothing per chunk is saved for backward. Rows where ``valid`` is False are never
    read (their logits may hold anything) and get 0. A chunk whose rows are all valid is read as
    a view (no gather copy); the logits may stay in bf16 (cast per chunk).
    """

    @staticmethod
    def _chunk(student, teacher, valid, a: int, chunk: int, dt, scale: float):
        v = valid[a : a + chunk]
        if bool(v.all()):
            idx = slice(a, a + v.numel())
        else:
            idx = v.nonzero()[:, 0] + a
        # a fresh copy (dtype cast or row gather) may be overwritten; a view of the inputs may not
        own_s = student.dtype != dt or not isinstance(idx, slice)
        own_t = teacher.dtype != dt or not isinstance(idx, slice)
        s, t = student[idx].to(dt), teacher[idx].to(dt)
        if scale != 1.0:
            s = s.mul_(scale) if own_s else s * scale
            t, own_t = (t.mul_(scale) if own_t else t * scale), True
        ls = torch.log_softmax(s, dim=-1)  # (C, V)
        lt = torch.log_softmax(t, dim=-1)
        d = ls.sub(lt) if not own_t else torch.sub(ls, lt, out=t)  # (C, V) log q - log p
        return idx, ls, ls.exp(), d

    @staticmethod
    def forward(ctx, student, teacher, valid, targets, chunk: int, scale: float):
        # student, teacher: (N, V); valid: (N,) bool; targets: (N,) long or None -> kl (N,), logq (N,)
        dt = compute_dtype(student.dtype)
        N = student.shape[0]
        kl = torch.zeros(N, dtype=dt, device=student.device)
        logq = torch.zeros(N, dtype=dt, device=student.device)
        for a in range(0, N, chunk):
            if not bool(valid[a : a + chunk].any()):
                continue
            idx, ls, q, d = RowReverseKL._chunk(student, teacher, valid, a, chunk, dt, scale)
            kl[idx] = torch.mul(q, d).nansum(-1)  # q = 0 where log q = -inf: those entries add nothing
            if targets is not None:
                logq[idx] = ls.gather(-1, targets[idx][:, None])[:, 0]
        ctx.save_for_backward(student, teacher, valid, targets, kl)
        ctx.chunk, ctx.scale = chunk, scale
        return kl, logq

    @staticmethod
    def backward(ctx, g_kl, g_logq):
        student, teacher, valid, targets, kl = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        dt = kl.dtype
        grad = torch.zeros_like(student)  # (N, V)
        for a in range(0, student.shape[0], ctx.chunk):
            if not bool(valid[a : a + ctx.chunk].any()):
                continue
            idx, ls, q, d = RowReverseKL._chunk(student, teacher, valid, a, ctx.chunk, dt, ctx.scale)
            # d KL / d s_v = q_v (log q_v - log p_v - KL);  d log q_y / d s_v = 1[v = y] - q_v
            # (in place on d: one chunk-sized buffer; q = 0 with log q = -inf gives NaN -> 0)
            g = d.sub_(kl[idx, None]).mul_(q).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            g = g.mul_(g_kl[idx, None].to(dt)) if g_kl is not None else g.zero_()
            if targets is not None and g_logq is not None:
                gl = g_logq[idx].to(dt)[:, None]
                g.addcmul_(q, gl, value=-1.0)
                g.scatter_add_(-1, targets[idx][:, None], gl)
            if ctx.scale != 1.0:
                g.mul_(ctx.scale)
            grad[idx] = g.to(grad.dtype)
        return grad, None, None, None, None, None

"""Per-rollout stopping statistics: did a response stop, was it cut at the token limit, does it
loop. Pure tensor functions over RIGHT-padded (B, T) responses (``mask`` 1 on valid tokens, EOS
included, the valid tokens a prefix of each row); padding never counts. Each returns a (B,) bool
tensor, so a caller sums it (and all-reduces the sum with its row count) to get a rate.

- :func:`stopped_rows`: the response ends with EOS (``ended`` when the sampler recorded it);
- :func:`cut_rows`: the response reached ``max_new_tokens`` valid tokens without stopping on EOS
  (cut at the limit; with the sampler every response either stops or is cut, so the rate is
  1 - EOS rate there, but the count does not rely on that);
- :func:`repeated_ngram_rows`: some n-gram of valid tokens (default n = 4) occurs at least twice
  in the response (occurrences may overlap: 5 equal tokens hold the same 4-gram twice). That is
  exactly "the response's distinct-4 is below 1"; it flags the loops a policy falls into when it
  keeps going instead of stopping (a short natural answer rarely repeats 4 tokens). n-grams
  reaching into padding do not exist; a response shorter than n + 1 tokens cannot repeat.
"""

from __future__ import annotations

import torch

__all__ = ["cut_rows", "repeated_ngram_rows", "stopped_rows"]


def stopped_rows(response_ids: torch.Tensor, mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B,) True where the last valid token is ``eos_id`` (an empty row did not stop)."""
    lengths = mask.long().sum(-1)  # (B,)
    last = response_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # (B,)
    return (last == eos_id) & (lengths > 0)


def cut_rows(mask: torch.Tensor, stopped: torch.Tensor, max_new_tokens: int | None = None) -> torch.Tensor:
    """(B,) True where a response was cut at the limit: ``max_new_tokens`` valid tokens and not
    ``stopped`` (a response whose EOS is its ``max_new_tokens``-th token stopped, it was not cut).
    ``max_new_tokens`` None: every non-empty response that did not stop (the sampler's case)."""
    lengths = mask.long().sum(-1)  # (B,)
    at_limit = lengths > 0 if max_new_tokens is None else lengths >= max_new_tokens
    return at_limit & ~stopped.bool().to(lengths.device)


def repeated_ngram_rows(response_ids: torch.Tensor, mask: torch.Tensor, n: int = 4) -> torch.Tensor:
    """(B,) True where some n-gram of valid tokens occurs at least twice in the row (exact:
    the rows' n-grams are sorted lexicographically and neighbours compared; no hashing)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    B, T = response_ids.shape
    W = T - n + 1  # n-gram start positions
    if W < 2:
        return torch.zeros(B, dtype=torch.bool, device=response_ids.device)
    lengths = mask.long().sum(-1)  # (B,)
    grams = response_ids.long().unfold(1, n, 1).clone()  # (B, W, n): grams[b, s] = ids[b, s:s+n]
    start = torch.arange(W, device=response_ids.device)
    valid = start[None, :] + n <= lengths[:, None]  # (B, W): the whole n-gram lies in the response
    # an invalid window gets a first "token" no valid one has and no other window shares
    grams[:, :, 0] = torch.where(valid, grams[:, :, 0], -1 - start[None, :].expand(B, W))
    # lexicographic order: stable sorts from the last column to the first
    order = start[None, :].expand(B, W)
    for k in range(n - 1, -1, -1):
        key = grams.gather(1, order[:, :, None].expand(B, W, n))[:, :, k]  # (B, W)
        idx = torch.sort(key, dim=1, stable=True).indices
        order = order.gather(1, idx)
    ranked = grams.gather(1, order[:, :, None].expand(B, W, n))  # (B, W, n) sorted
    same = (ranked[:, 1:] == ranked[:, :-1]).all(-1)  # (B, W-1): equal neighbours
    return same.any(-1)

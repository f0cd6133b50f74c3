"""Per-rollout stopping statistics (``functional.stopping``) and their rates in the rollout
statistics (``rollouts.rollout_stats``), against hand-computed examples; padding never counts."""

from __future__ import annotations

import pytest
import torch

from minidistill.functional import stopping
from minidistill.parts import rollouts

EOS, PAD = 2, 0


def _rows(rows: list[list[int]], width: int | None = None, pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask) from token lists."""
    T = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_stopped_and_cut_rows_hand_computed():
    ids, mask = _rows(
        [
            [5, 6, EOS],  # stopped early
            [5, 6, 7, 8],  # cut at the limit 4
            [5, 6, 7, EOS],  # stopped exactly at the limit: not cut
            [5],  # neither (a shorter row without EOS: not at the limit)
        ],
        width=6,
    )
    stopped = stopping.stopped_rows(ids, mask, EOS)
    assert stopped.tolist() == [True, False, True, False]
    assert stopping.cut_rows(mask, stopped, max_new_tokens=4).tolist() == [False, True, False, False]
    # without a limit every row that did not stop counts as cut (the sampler's rows stop or hit it)
    assert stopping.cut_rows(mask, stopped).tolist() == [False, True, False, True]


def test_stopped_rows_ignores_padding_that_is_eos():
    # pad == EOS (many tokenizers): a cut row padded with EOS did not stop
    ids, mask = _rows([[5, 6, 7], [5, EOS]], width=5, pad=EOS)
    assert stopping.stopped_rows(ids, mask, EOS).tolist() == [False, True]
    empty_ids, empty_mask = torch.full((1, 3), EOS), torch.zeros((1, 3), dtype=torch.long)
    assert stopping.stopped_rows(empty_ids, empty_mask, EOS).tolist() == [False]


def test_repeated_ngram_rows_hand_computed():
    ids, mask = _rows(
        [
            [1, 2, 3, 4, 1, 2, 3, 4],  # 4-gram 1 2 3 4 twice
            [1, 2, 3, 4, 5, 1, 2, 3],  # only 3-grams repeat
            [7, 7, 7, 7, 7],  # overlapping: 7 7 7 7 at 0 and 1
            [7, 7, 7, 7],  # one 4-gram only
            [1, 2, 3, 4, 9, 9],  # see the padding test below
        ],
        width=10,
    )
    assert stopping.repeated_ngram_rows(ids, mask, 4).tolist() == [True, False, True, False, False]
    assert stopping.repeated_ngram_rows(ids, mask, 3).tolist() == [True, True, True, True, False]
    assert stopping.repeated_ngram_rows(ids, mask, 1).tolist() == [True, True, True, True, True]
    assert stopping.repeated_ngram_rows(ids, mask, 9).tolist() == [False] * 5  # n > every length


def test_repeated_ngram_rows_padding_never_counts():
    # the pad id equals tokens of the response, and padding would complete a repeat of the
    # row's own first 4-gram if windows reaching into it counted
    ids = torch.tensor([[1, 2, 3, 4, 9, 1, 2, 3, 4, 4]])
    for length in (8, 9):  # 1 2 3 4 | 9 1 2 3 (4 4 pad)  /  1 2 3 4 9 1 2 3 4 (4 pad)
        mask = (torch.arange(10) < length).long()[None]
        assert stopping.repeated_ngram_rows(ids, mask, 4).item() is (length == 9)
    # all-padding rows, padding full of one token
    mask = torch.zeros((2, 10), dtype=torch.long)
    assert stopping.repeated_ngram_rows(torch.zeros((2, 10), dtype=torch.long), mask, 4).tolist() == [False, False]
    # the same responses with more padding give the same answer
    ids, mask = _rows([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 5, 6, 5]])
    wide_ids, wide_mask = _rows([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 5, 6, 5]], width=30, pad=5)
    assert stopping.repeated_ngram_rows(ids, mask, 4).tolist() == [True, False]
    assert stopping.repeated_ngram_rows(wide_ids, wide_mask, 4).tolist() == [True, False]
    assert stopping.repeated_ngram_rows(wide_ids, wide_mask, 3).tolist() == [True, True]


def test_repeated_ngram_rows_matches_a_python_count():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 3, (64, 12), generator=g)
    lengths = torch.randint(0, 13, (64,), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    for n in (1, 2, 3, 4):
        want = []
        for row, n_valid in zip(ids.tolist(), lengths.tolist()):
            grams = [tuple(row[s : s + n]) for s in range(n_valid - n + 1)]
            want.append(len(set(grams)) < len(grams))
        assert stopping.repeated_ngram_rows(ids, mask, n).tolist() == want, n


def _buffer(rows, width, ended=None):
    ids, mask = _rows(rows, width=width)
    zeros = torch.zeros(ids.shape)
    buf = {"response_ids": ids, "response_mask": mask, "rewards": -mask.float(), "student_logp": zeros}
    buf["teacher_logp"] = zeros
    if ended is not None:
        buf["ended"] = torch.tensor(ended)
    return buf


def test_rollout_stats_rates_and_global_sums():
    rows = [
        [5, 6, EOS],  # stops
        [1, 2, 3, 4, 1, 2, 3, 4],  # cut at 8, repeats
        [7, 7, 7, 7, 7, 7, 7, EOS],  # stops at the limit, repeats
        [3, 4, 5, 6, 7, 8, 9, 10],  # cut, no repeat
    ]
    stats = rollouts.rollout_stats(_buffer(rows, 10), EOS, max_new_tokens=8)
    assert stats["eos_rate"] == pytest.approx(0.5)
    assert stats["cut_rate"] == pytest.approx(0.5)
    assert stats["repeat_rate"] == pytest.approx(0.5)
    assert stats["response_length"] == pytest.approx(27 / 4) and stats["reward"] == pytest.approx(-1.0)
    # the sampler's ``ended`` wins over the last token (a row it marks stopped, another it does not)
    stats = rollouts.rollout_stats(_buffer(rows, 10, ended=[True, True, True, False]), EOS, max_new_tokens=8)
    assert stats["eos_rate"] == pytest.approx(0.75) and stats["cut_rate"] == pytest.approx(0.25)
    # every count goes through reduce_sum: a second process with the same rollouts halves nothing
    seen = []

    def twice(t):
        seen.append(t.clone())
        return 2 * t

    doubled = rollouts.rollout_stats(_buffer(rows, 10), EOS, reduce_sum=twice, max_new_tokens=8)
    assert len(seen) == 1 and seen[0].numel() == 7  # one all-reduce for every sum and count
    for k in ("eos_rate", "cut_rate", "repeat_rate", "response_length", "reward"):
        assert doubled[k] == pytest.approx(rollouts.rollout_stats(_buffer(rows, 10), EOS, max_new_tokens=8)[k]), k
    # two processes with different rollouts: the rates are those of all rows together
    a, b = _buffer(rows[:1], 10), _buffer(rows[1:], 10)
    other = {}

    def capture(t):
        other["b"] = t
        return t

    rollouts.rollout_stats(b, EOS, reduce_sum=capture, max_new_tokens=8)
    both = rollouts.rollout_stats(a, EOS, reduce_sum=lambda t: t + other["b"], max_new_tokens=8)
    alone = rollouts.rollout_stats(_buffer(rows, 10), EOS, max_new_tokens=8)
    assert both == pytest.approx(alone)

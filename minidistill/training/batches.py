"""Batch sources for the training loop: endless, resumable streams of micro-batches."""

from __future__ import annotations

from typing import Callable

import torch


class ShuffledBatches:
    """Shuffle ``n`` items per epoch (seeded by ``seed + epoch``) and yield micro-batches forever.

    With several processes every process draws the same permutation and takes its slice of each
    global batch (``batch_size * world`` items), so one process with batch B*w sees exactly the
    same data per step as w processes with batch B each. An optimizer step takes ``accum``
    consecutive micro-batches; an epoch ends at a step boundary, when a whole step
    (``batch_size * world * accum`` items) no longer fits, so batch 8 x accum 1 and batch 1 x
    accum 8 see the same items in every step.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        make_batch: Callable[[list[int]], dict],
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        accum: int = 1,
    ):
        if n <= 0:
            raise ValueError("empty dataset")
        self.n, self.batch_size, self.make_batch = n, batch_size, make_batch
        self.seed, self.rank, self.world, self.shuffle, self.accum = seed, rank, world, shuffle, max(1, accum)
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch (a whole number of optimizer steps)."""
        per_step = self.batch_size * self.world * self.accum
        return max(1, self.n // per_step) * self.accum

    def next_batch(self) -> dict:
        global_bs = self.batch_size * self.world
        step_items = global_bs * self.accum
        at_step_start = self.pos % step_items == 0
        if at_step_start and self.pos + step_items > self.n and self.pos > 0:  # drop the ragged tail: a new epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = [self._perm[(self.pos + i) % self.n] for i in range(global_bs)]
        self.pos += global_bs
        mine = idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.make_batch(mine)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        if "inner" in state:  # a PD checkpoint written when PD wrapped this class to count steps
            state = state["inner"]
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()

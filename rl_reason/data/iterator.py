"""A deterministic, resumable order over a data set's examples.

The order of epoch e is a permutation seeded by (seed, e), so the iterator's
whole state is two integers (epoch, index) that go into the checkpoint's
progress; restoring them continues with exactly the batch that would have
come next, across epoch boundaries too (a batch that straddles the boundary
takes the end of one epoch and the start of the next, neither skipping nor
repeating an example). Every process walks the same order and gets the whole
global batch of indices; which of its rows a process reads is the mesh's
business (`sharding.process_rows`), not the iterator's.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class IndexIterator:
    """Yields arrays of example indices, `batch_size` at a time, forever."""

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if num_examples <= 0:
            raise ValueError("The data set is empty.")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def __next__(self) -> np.ndarray:
        """The next global batch of indices (all processes' rows)."""
        taken = []
        needed = self.batch_size
        while needed:
            order = self._order(self.epoch)
            chunk = order[self.index : self.index + needed]
            taken.append(chunk)
            needed -= len(chunk)
            self.index += len(chunk)
            if self.index == self.num_examples:
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(taken)

    def __iter__(self):
        return self

    def state(self) -> dict[str, Any]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def restore(self, state: dict[str, Any]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index < self.num_examples or epoch < 0:
            raise ValueError(
                f"Iterator state {state} does not fit a data set of {self.num_examples}."
            )
        self.epoch, self.index = epoch, index

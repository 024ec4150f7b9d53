"""A deterministic, resumable order over a data set's examples.

The order of epoch e is a permutation seeded by (seed, e), so the iterator's
whole state is two integers (epoch, index) that go into the checkpoint's
progress; restoring them continues with exactly the batch that would have
come next, across epoch boundaries too (a batch that straddles the boundary
takes the end of one epoch and the start of the next, neither skipping nor
repeating an example).
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
        process_index: int = 0,
        process_count: int = 1,
    ):
        if num_examples <= 0:
            raise ValueError("The data set is empty.")
        if batch_size % process_count:
            raise ValueError(
                f"Global batch {batch_size} is not divisible by {process_count} processes."
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.epoch = 0
        self.index = 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def next_global(self) -> np.ndarray:
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

    def __next__(self) -> np.ndarray:
        """This process's slice of the next global batch."""
        per_process = self.batch_size // self.process_count
        start = self.process_index * per_process
        return self.next_global()[start : start + per_process]

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

"""The study's metrics for one question, on its K samples.

These work on what has already been read from the samples -- each sample's
answer key (its canonical final answer, None if it has none), whether it is
correct, and optionally a scorer's score -- so extraction and equivalence
run once per sample however many metrics are asked for. ``evaluate``
averages them over questions.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence


def majority_index(keys: Sequence[Hashable | None]) -> int | None:
    """The first sample of the most common answer (None = no answer never wins).

    Ties go to the answer that appears first, so the vote is deterministic
    and does not depend on hashing or sort order.
    """
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
            first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[best]


def maj_at_k(keys: Sequence[Hashable | None], correct: Sequence[bool]) -> bool:
    """Whether the plurality answer among the samples is correct (False if no sample answers)."""
    index = majority_index(keys)
    return index is not None and bool(correct[index])


def rerank_at_k(scores: Sequence[float], correct: Sequence[bool]) -> bool:
    """Whether the highest-scoring sample (the first one on ties) is correct."""
    if not scores:
        return False
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return bool(correct[best])


def pass_at_k(correct: Sequence[bool]) -> bool:
    """The study's pass@K: whether any of the K samples is correct."""
    return any(correct)


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples with c correct (Chen et al., 2021).

    ``1 - C(n-c, k) / C(n, k)``: the chance that k samples drawn without
    replacement from the n include a correct one.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def distinct(values: Sequence[Hashable | None]) -> int:
    """How many different values there are, not counting None."""
    return len({value for value in values if value is not None})

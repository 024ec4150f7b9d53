"""Rewards from an outcome reward model (ORM), sparse or dense.

The ORM itself lives in ``algorithms``; here it is any ``scorer`` callable
``scorer(completions, batch, offsets) -> scores`` that returns, for each
completion, the ORM's score (its estimate that the solution ends correct)
of the text up to each requested character offset -- i.e. at the token that
ends there, as ``token_positions.char_to_token_positions`` finds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar

from rl_reason.rewards.functions import Batch, Dense
from rl_reason.rewards.steps import split_steps

Scorer = Callable[[Sequence[str], Batch, Sequence[Sequence[int]]], Sequence[Sequence[float]]]


@dataclasses.dataclass(frozen=True)
class OrmOutcome:
    """Sparse: ``scale`` times the ORM's score of the whole completion (its final token)."""

    dense: ClassVar[bool] = False
    collective: ClassVar[bool] = True  # the scorer runs on the mesh: every process, every row
    scorer: Scorer
    scale: float = 1.0

    def __call__(self, completions: Sequence[str], batch: Batch) -> list[float]:
        scores = self.scorer(completions, batch, [[len(text)] for text in completions])
        return [self.scale * float(row[0]) for row in scores]


@dataclasses.dataclass(frozen=True)
class OrmSteps:
    """Dense: ``scale`` times the ORM's score at the end of every step (the last included)."""

    dense: ClassVar[bool] = True
    collective: ClassVar[bool] = True
    scorer: Scorer
    scale: float = 1.0

    def __call__(self, completions: Sequence[str], batch: Batch) -> Dense:
        offsets = [[step.end for step in split_steps(text)] for text in completions]
        scores = self.scorer(completions, batch, offsets)
        return [
            [
                (offset, self.scale * float(score))
                for offset, score in zip(row_offsets, row_scores, strict=True)
            ]
            for row_offsets, row_scores in zip(offsets, scores, strict=True)
        ]

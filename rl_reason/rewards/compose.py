"""One reward from several, weighted as a config says.

A config maps reward names to a weight or to a dict of ``weight`` plus the
reward's settings::

    {"correctness": 1.0, "step_match": {"weight": 0.2, "scale": 1.0}}

Objects a config cannot hold (the ORM's scorer) are passed to
:func:`compose` as keywords and given to every factory that takes them.
The result keeps both views the algorithms need: a total per completion
(EI, RCRL, logging) and ``(character offset, reward)`` pairs per completion
for PPO, sparse rewards being paid at the end of the completion.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

from rl_reason.parallel import distributed
from rl_reason.rewards import registry
from rl_reason.rewards.functions import Batch, Dense


@dataclasses.dataclass(frozen=True)
class Rewards:
    totals: list[float]  # weighted sum of every reward, per completion
    dense: Dense  # weighted (offset, reward) pairs per completion, sorted by offset
    components: dict[str, list[float]]  # each reward's unweighted total per completion


@dataclasses.dataclass(frozen=True)
class Composite:
    """Weighted rewards; call it like a single reward function."""

    terms: tuple[tuple[str, float, Callable[..., Any]], ...]  # (name, weight, reward)

    def __call__(self, completions: Sequence[str], batch: Batch) -> Rewards:
        dense: Dense = [[] for _ in completions]
        components = {}
        for name, weight, reward in self.terms:
            values = _call(reward, completions, batch)
            if not reward.dense:
                values = [[(len(text), value)] for text, value in zip(completions, values)]
            components[name] = [sum((r for _, r in pairs), 0.0) for pairs in values]
            for row, pairs in zip(dense, values):
                row.extend((offset, weight * r) for offset, r in pairs)
        for row in dense:
            row.sort(key=lambda pair: pair[0])
        totals = [sum((r for _, r in row), 0.0) for row in dense]
        return Rewards(totals=totals, dense=dense, components=components)


def _call(reward: Callable[..., Any], completions: Sequence[str], batch: Batch) -> list:
    """One reward's values for every completion. A rule-based reward is host work, split
    across the processes of a multi-host run; one that runs a program on the mesh
    (``collective = True``: the ORM) is called by every process with every row."""
    if getattr(reward, "collective", False):
        return reward(completions, batch)
    return distributed.map_shared(
        lambda share: reward(completions[share], {k: v[share] for k, v in batch.items()}),
        len(completions),
    )


def compose(spec: Mapping[str, Any], **runtime: Any) -> Composite:
    """The weighted sum of the rewards named in ``spec`` (see the module docstring)."""
    terms = []
    for name, value in spec.items():
        settings = {} if isinstance(value, Real) else dict(value)
        weight = float(value) if isinstance(value, Real) else float(settings.pop("weight", 1.0))
        factory = registry.factory(name)
        accepted = inspect.signature(factory).parameters
        extras = {key: obj for key, obj in runtime.items() if key in accepted}
        terms.append((name, weight, factory(**extras, **settings)))
    return Composite(tuple(terms))

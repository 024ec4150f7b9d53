"""Reward functions by name, so a config can list them.

Built-ins are registered here; research code adds its own with
:func:`register`. A factory is any callable whose keyword arguments are the
reward's settings and that returns a reward function (see ``functions``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rl_reason.rewards.functions import CalculatorConsistency, Correctness, Format, StepMatch
from rl_reason.rewards.orm import OrmOutcome, OrmSteps

_FACTORIES: dict[str, Callable[..., Any]] = {
    "correctness": Correctness,
    "format": Format,
    "step_match": StepMatch,
    "calculator": CalculatorConsistency,
    "orm_outcome": OrmOutcome,
    "orm_steps": OrmSteps,
}


def register(name: str, factory: Callable[..., Any]) -> None:
    """Makes ``factory`` available to configs as ``name``."""
    if name in _FACTORIES:
        raise ValueError(f"a reward named {name!r} is already registered")
    _FACTORIES[name] = factory


def names() -> list[str]:
    return sorted(_FACTORIES)


def factory(name: str) -> Callable[..., Any]:
    """The factory registered as ``name``."""
    if name not in _FACTORIES:
        raise KeyError(f"no reward named {name!r}; known: {names()}")
    return _FACTORIES[name]

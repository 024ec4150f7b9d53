"""Named registries: how a config names an advantage estimator or a policy loss.

  ESTIMATORS = {}
  register_estimator = registrar(ESTIMATORS, "Advantage estimator")

  @register_estimator("grpo")
  def _group_normalised(...): ...

tunix registers its advantage estimators and policy losses the same way
(`rl/function_registry.py`): a new one is one decorated function, and the
config's validation lists what is there.
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def registrar(table: dict[str, F], what: str) -> Callable[..., Callable[[F], F]]:
    """A decorator factory: `@register(name, ...)` adds the function to `table` under each
    name; a name taken already is an error naming `what` it is."""

    def register(*names: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            for name in names:
                if name in table:
                    raise ValueError(f"{what} {name!r} is already registered.")
                table[name] = fn
            return fn

        return add

    return register

"""Optimizers and learning-rate schedules from config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a schedule: what `make_optimizer` builds.

    The defaults are the run configs' (`experiments.config.base_config().optim`),
    so research code can write `make_optimizer(OptimConfig(lr=1e-4), steps)`; a run
    config's `optim` section is accepted as it is (the same fields).
    """

    lr: float = 1e-3
    schedule: str = "cosine"  # SCHEDULES
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1  # the cosine/linear schedule's end, as a fraction of lr
    weight_decay: float = 0.01  # decoupled; not on norms, biases or embeddings (decay_mask)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 = none
    state_dtype: str = ""  # "float32": Adam's state in float32 under bfloat16 params

    @classmethod
    def of(cls, config: Any) -> "OptimConfig":
        """`config` itself, or a run config's `optim` section (a mapping of the same
        fields) as an OptimConfig: unknown keys are an error, missing ones the defaults."""
        if isinstance(config, cls):
            return config
        values = dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"optim: unknown keys {unknown}; OptimConfig has {sorted(names)}.")
        return cls(**values)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} not in {SCHEDULES}")
        if self.state_dtype not in ("", "float32"):
            raise ValueError(f"state_dtype={self.state_dtype!r} not in ('', 'float32')")


def learning_rate_schedule(
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    kind: str = "cosine",
    final_fraction: float = 0.1,
) -> optax.Schedule:
    """Linear warm-up, then constant, cosine or linear decay to final_fraction * lr."""
    if kind not in SCHEDULES:
        raise ValueError(f"Unknown schedule {kind!r}; choose one of {SCHEDULES}.")
    warmup_steps = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "constant":
        decay = optax.constant_schedule(lr)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=final_fraction)
    else:
        decay = optax.linear_schedule(lr, lr * final_fraction, decay_steps)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def _names(path) -> list[str]:
    """The names along a pytree path (dict keys, attribute names)."""
    return [getattr(k, "key", getattr(k, "name", str(k))) for k in path]


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: not on norms, biases or embeddings."""

    def decays(path, _):
        return _names(path)[-1] in ("kernel", "lm_head")

    return jax.tree_util.tree_map_with_path(decays, params)


def scale_embedding_rows(row_scales: Mapping[int, float]) -> optax.GradientTransformation:
    """Multiplies the updates of the token embedding's rows ``row_scales`` names by their
    factors; every other update passes unchanged.

    Tokens added to a trained model (RCRL's return tokens) start as one
    average row and must move far -- to where a real token that changes the
    next prediction sits -- from a gradient that only a few positions of a
    sample give and that is mostly noise. Under Adam every coordinate moves
    at most about the learning rate a step, so at the rate the rest of the
    model is fine-tuned the rows barely separate; a larger rate for the new
    rows alone is what prompt tuning does for its soft tokens (Lester et al.
    2021). The embedding is the leaf at ``.../embedder/embedding`` [V, E].
    """

    def update(updates, state, params=None):
        del params

        def scale(path, leaf):
            if _names(path)[-2:] != ["embedder", "embedding"]:
                return leaf
            factors = np.ones(leaf.shape[0], np.float32)
            for row, factor in row_scales.items():
                factors[row] = factor
            return leaf * jnp.asarray(factors, leaf.dtype)[:, None]

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    config, total_steps: int, embedding_row_scales: Mapping[int, float] | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; `config` an `OptimConfig` or a run config's `optim`
    section (its fields).

    `embedding_row_scales` ({token id: factor}) scales those embedding rows'
    updates after AdamW (see `scale_embedding_rows`)."""
    config = OptimConfig.of(config)
    schedule = learning_rate_schedule(
        config.lr, total_steps, config.warmup_steps, config.schedule, config.final_lr_fraction
    )
    parts = []
    if config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        )
    )
    if embedding_row_scales and any(f != 1.0 for f in embedding_row_scales.values()):
        parts.append(scale_embedding_rows(embedding_row_scales))
    tx = optax.chain(*parts)
    if config.state_dtype == "float32":
        tx = float32_state(tx)
    return tx, schedule


def float32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` with its state (Adam's moments) and its arithmetic in float32 whatever the
    parameters' dtype: the memory option of bfloat16 parameters (half the masters' bytes)
    without bfloat16 moments, whose second moment loses small gradients. The update is
    rounded to the parameters' dtype once, at the end (an update below 2^-8 of its weight
    still vanishes there: the price of bfloat16 masters). With float32 parameters it is
    `tx` itself, number for number."""

    def widened(tree):
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)

    def init(params):
        return tx.init(widened(params))

    def update(updates, state, params=None):
        wide, state = tx.update(
            widened(updates), state, None if params is None else widened(params)
        )
        return jax.tree.map(lambda u, g: u.astype(g.dtype), wide, updates), state

    return optax.GradientTransformation(init, update)

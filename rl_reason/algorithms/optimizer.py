"""Optimizers and learning-rate schedules from config."""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("constant", "cosine", "linear")


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


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: not on norms, biases or embeddings."""

    def decays(path, _):
        name = getattr(path[-1], "key", str(path[-1]))
        return name in ("kernel", "lm_head")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; `config` is the `optim` section."""
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
    return optax.chain(*parts), schedule

"""Gradient accumulation over micro-batches: one accumulator for SFT, PPO and the ORM.

A batch too large for one forward/backward is split into micro-batches whose
gradients are summed (in float32, then cast to the parameters' dtypes) by a
`lax.scan`, so the program's memory holds one micro-batch's activations and
one gradient accumulator. Losses must already be normalised by whole-batch
counts (token totals), so that the sums are exactly the full batch's values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]
GradFn = Callable[[Any, Batch], tuple[Any, Any]]  # (params, micro) -> (grads, aux)


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
    """[B, ...] -> [A, B / A, ...], micro-batch i taking rows i, i + A, ...

    Strided rather than contiguous rows, so that every micro-batch keeps an
    even share of every batch shard on the mesh.
    """

    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"Batch size {x.shape[0]} is not divisible by num_microbatches={num_microbatches}."
            )
        x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        return x.swapaxes(0, 1)

    return jax.tree.map(split, batch)


def sum_aux(total: Any, one: Any) -> Any:
    return jax.tree.map(jnp.add, total, one)


def zeros_like_aux(shapes: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)


def accumulate_gradients(
    grad_fn: GradFn,
    params: Any,
    batch: Batch,
    num_microbatches: int,
    *,
    combine: Callable[[Any, Any], Any] = sum_aux,
    identity: Callable[[Any], Any] = zeros_like_aux,
) -> tuple[Any, Any]:
    """(grads, aux) of `grad_fn` over `batch`, summed over `num_microbatches` micro-batches.

    `aux` (the loss's side outputs) is combined by `combine` from `identity(shapes)`:
    summed from zeros by default (token counts, loss sums); PPO also keeps maxima.
    """
    if num_microbatches == 1:  # no accumulator: one gradient tree less in memory
        grads, aux = grad_fn(params, batch)
    else:
        micro = split_microbatches(batch, num_microbatches)

        def add(carry, one_micro):
            grads, aux = carry
            g, a = grad_fn(params, one_micro)
            return (jax.tree.map(jnp.add, grads, g), combine(aux, a)), None

        aux_shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))[1]
        init = (
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            identity(aux_shapes),
        )
        (grads, aux), _ = jax.lax.scan(add, init, micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, aux

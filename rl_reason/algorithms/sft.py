"""Supervised fine-tuning: masked next-token cross-entropy as one pure step.

The same step trains Expert Iteration's rounds (fine-tuning on the kept
samples), so it takes any batch of {tokens, input_mask, loss_mask}.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from rl_reason.algorithms.logprobs import token_logprobs
from rl_reason.algorithms.microbatch import (  # noqa: F401 (split_microbatches re-exported)
    accumulate_gradients,
    split_microbatches,
)
from rl_reason.algorithms.train_state import TrainState
from rl_reason.models.transformer import Transformer

Batch = dict[str, jax.Array]


def sft_loss(
    params: Any, batch: Batch, model: Transformer, normalizer: jax.Array, chunk_size: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum of target-token NLL divided by `normalizer` (the whole batch's target count).

    Dividing by the full batch's count, not the micro-batch's, makes gradient
    accumulation give exactly the gradient of the full-batch token mean.
    """
    scored = token_logprobs(
        model, params, batch["tokens"], batch["input_mask"], chunk_size=chunk_size
    )
    weights = target_weights(batch)
    nll = -(scored.logprobs * weights).sum()
    hits = (scored.is_argmax * weights).sum()
    return nll / normalizer, {"nll_sum": nll, "hits": hits}


def target_weights(batch: Batch) -> jax.Array:
    """loss_mask restricted to real tokens that have a context (not position 0)."""
    weights = (batch["loss_mask"] & batch["input_mask"]).astype(jnp.float32)
    return weights.at[:, 0].set(0.0)


def sft_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Transformer,
    tx: optax.GradientTransformation,
    num_microbatches: int = 1,
    chunk_size: int = 256,
    lr_schedule: Optional[optax.Schedule] = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from one batch, accumulating over micro-batches."""
    num_targets = target_weights(batch).sum()
    normalizer = jnp.maximum(num_targets, 1.0)
    grad_fn = jax.grad(
        lambda params, micro: sft_loss(params, micro, model, normalizer, chunk_size), has_aux=True
    )
    grads, aux = accumulate_gradients(grad_fn, state.params, batch, num_microbatches)
    nll, hits = aux["nll_sum"], aux["hits"]

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": nll / normalizer,
        "token_accuracy": hits / normalizer,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "target_tokens": num_targets,
    }
    metrics["finite"] = all_finite(metrics["loss"], metrics["grad_norm"], metrics["param_norm"])
    if lr_schedule is not None:
        metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    rng, _ = jax.random.split(state.rng)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


def all_finite(*values: jax.Array) -> jax.Array:
    """1.0 when every value is finite, else 0.0: the step metric a loop checks
    before it logs or saves (a NaN gradient can leave the loss finite)."""
    return jnp.all(jnp.isfinite(jnp.stack([jnp.asarray(v, jnp.float32) for v in values]))).astype(
        jnp.float32
    )


def make_sft_step(model: Transformer, tx: optax.GradientTransformation, **options) -> Any:
    """Binds the static parts, leaving the pure `step(state, batch)`."""
    return functools.partial(sft_step, model=model, tx=tx, **options)

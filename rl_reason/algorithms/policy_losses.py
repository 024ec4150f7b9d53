"""Policy-gradient losses by name: PPO's clipped ratio (with DAPO's clip-higher), GSPO, CISPO.

`ppo.ppo_loss` asks `PPOConfig.policy_loss` for one of these and weighs its
per-token terms by the configured aggregation; values, entropy, the KL term,
micro-batches and sharding are the update's and stay shared. Each loss maps

  (logprobs, old_logprobs, advantages, valid, clip_low, clip_high)
      -> PolicyTerms(per_token, clipped, ratio)    all [N, L]

where `logprobs` carry the gradient, `old_logprobs` are the rollout's (stop-
gradient) and the importance ratio's clip band is [1 - clip_low, 1 + clip_high]
(clip_low = clip_high is PPO's symmetric clip). Entries off `valid` may hold
anything: the update weighs them 0. Register a new loss with
`register_policy_loss` (tunix registers its policy losses the same way).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from rl_reason.algorithms.registries import registrar


class PolicyTerms(NamedTuple):
    per_token: jax.Array  # the loss on each token, before aggregation
    clipped: jax.Array  # bool: where the clip changed the token's gradient
    ratio: jax.Array  # the importance ratio the loss used (token or sequence level)


PolicyLoss = Callable[..., PolicyTerms]

POLICY_LOSSES: dict[str, PolicyLoss] = {}


register_policy_loss = registrar(POLICY_LOSSES, "Policy loss")
"""Registers a policy loss under `ppo.policy_loss=name`."""


def clipped_policy_loss(
    ratio: jax.Array, advantages: jax.Array, clip_low: float, clip_high: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-token -min(r A, clip(r, 1 - low, 1 + high) A), and where the clipped term is taken.

    Where it is taken the token's gradient is 0: the policy already moved
    that token's probability far enough in the advantage's direction. A
    higher upper bound (DAPO's clip-higher, 0.28 against 0.2) lets unlikely
    tokens with a positive advantage grow further before the clip stops them,
    which keeps the entropy from collapsing. clip_high=None: clip_low.
    """
    clip_high = clip_low if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped, clipped), clipped > unclipped


def token_log_ratio(logprobs: jax.Array, old_logprobs: jax.Array, valid: jax.Array) -> jax.Array:
    """log pi(y_t) - log pi_old(y_t) on valid tokens, 0 elsewhere."""
    return jnp.where(valid, logprobs - old_logprobs, 0.0)


def sequence_log_ratio(log_ratio: jax.Array, valid: jax.Array) -> jax.Array:
    """[N, 1]: the mean token log-ratio of each row, log of GSPO's length-normalised
    sequence ratio (pi(y) / pi_old(y)) ** (1 / |y|); 0 for a row without valid tokens."""
    weights = valid.astype(jnp.float32)
    tokens = jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
    return (log_ratio * weights).sum(axis=1, keepdims=True) / tokens


@register_policy_loss("ppo")
def ppo_clip(logprobs, old_logprobs, advantages, valid, clip_low, clip_high) -> PolicyTerms:
    """PPO's token-level clipped ratio (Schulman et al. 2017); DAPO's clip-higher when
    clip_high > clip_low (Yu et al. 2025)."""
    ratio = jnp.exp(token_log_ratio(logprobs, old_logprobs, valid))
    per_token, clipped = clipped_policy_loss(ratio, advantages, clip_low, clip_high)
    return PolicyTerms(per_token, clipped, ratio)


@register_policy_loss("gspo")
def gspo(logprobs, old_logprobs, advantages, valid, clip_low, clip_high) -> PolicyTerms:
    """GSPO (Zheng et al. 2025): one ratio per sequence, the geometric mean of its token
    ratios, clipped as a whole; every token of a row carries the row's term.

    With `loss_aggregation="seq_mean_token_mean"` the loss is the paper's mean
    over sequences of -min(s A, clip(s) A). Its clip band is narrow (the paper:
    3e-4 below, 4e-4 above) because a length-normalised ratio moves little.
    """
    log_ratio = token_log_ratio(logprobs, old_logprobs, valid)
    ratio = jnp.broadcast_to(jnp.exp(sequence_log_ratio(log_ratio, valid)), log_ratio.shape)
    per_token, clipped = clipped_policy_loss(ratio, advantages, clip_low, clip_high)
    return PolicyTerms(per_token, clipped, ratio)


@register_policy_loss("gspo_token")
def gspo_token(logprobs, old_logprobs, advantages, valid, clip_low, clip_high) -> PolicyTerms:
    """GSPO-token: s_t = sg[s] * pi(y_t) / sg[pi(y_t)], the sequence ratio's value with each
    token's own gradient, so token-level advantages can differ along a row. With one
    advantage per row it equals GSPO in value and gradient."""
    log_ratio = token_log_ratio(logprobs, old_logprobs, valid)
    sequence = jax.lax.stop_gradient(sequence_log_ratio(log_ratio, valid))
    ratio = jnp.exp(sequence + logprobs - jax.lax.stop_gradient(logprobs))
    per_token, clipped = clipped_policy_loss(ratio, advantages, clip_low, clip_high)
    return PolicyTerms(per_token, clipped, ratio)


@register_policy_loss("cispo")
def cispo(logprobs, old_logprobs, advantages, valid, clip_low, clip_high) -> PolicyTerms:
    """CISPO (MiniMax-M1, 2025): REINFORCE weighted by the clipped, stop-gradient ratio,
    -sg(clip(r, 1 - low, 1 + high)) A log pi(y_t), so no token loses its gradient (PPO's
    clip zeroes it); the clip only bounds the weight.

    Written as -sg(c) A exp(log pi - sg(log pi)): the same gradient, -c A grad log pi,
    with the value -c A, comparable to PPO's -r A (the paper's form has the value
    -c A log pi).
    """
    ratio = jnp.exp(token_log_ratio(logprobs, old_logprobs, valid))
    weight = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high))
    per_token = -advantages * weight * jnp.exp(logprobs - jax.lax.stop_gradient(logprobs))
    return PolicyTerms(per_token, weight != ratio, ratio)

"""KL between the policy and the reference model, per token, and its coefficient.

The study pays the KL in the reward (trlx's PPO: r_t - beta * KL_t with
beta = 0.05); GRPO instead adds it to the loss. Both use `kl_estimate`. The
estimators are Schulman's (http://joschu.net/blog/kl-approx.html), for
samples drawn from the policy whose log-probs are `logp`:

  k1 = log p - log q                       unbiased, high variance, can be < 0
  k2 = 0.5 (log p - log q)^2               biased, low variance, >= 0
  k3 = q/p - 1 - log(q/p)                  unbiased, low variance, >= 0
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")

# |log p - log q| beyond this is a policy far off its reference; exp(20) is
# still finite in float32 (exp(89) is not), so k3 cannot overflow.
MAX_LOG_RATIO = 20.0


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token estimate of KL(policy || reference), float32, same shape as logp.

    The log-ratio is computed in float32 and clamped to [-20, 20] before any
    exp, as verl's `kl_penalty` does for its k3 ("low_var_kl"); tunix's
    `rl/common.py::compute_kl_divergence` computes the same three estimators
    in float32 (its names: kl, mse_kl, low_var_kl) and offers a clamp of the
    result instead. Clamping the log-ratio once for all three estimators
    keeps them consistent with each other and finite even for -inf inputs.
    Unmasked: multiply by the loss mask before reducing.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}.")
    log_ratio = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
    log_ratio = jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    return jnp.exp(-log_ratio) + log_ratio - 1.0  # k3 with q/p = exp(-log_ratio)


def all_kl_estimates(
    logp: jax.Array, ref_logp: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """{"kl_k1", "kl_k2", "kl_k3"}: each estimator's mean over the valid tokens, for logging."""
    weights = mask.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    return {
        f"kl_{name}": (kl_estimate(logp, ref_logp, name) * weights).sum() / count
        for name in KL_ESTIMATORS
    }


def adaptive_kl_update(
    coef: float | jax.Array,
    observed_kl: float | jax.Array,
    num_steps: int | jax.Array,
    target: Optional[float],
    horizon: float,
) -> jax.Array:
    """The KL coefficient after one iteration of the adaptive controller.

    Ziegler et al. 2019 (as TRL's and trlx's AdaptiveKLController): the
    proportional error e = clip(KL / target - 1, -0.2, 0.2) moves the
    coefficient by a factor 1 + e * num_steps / horizon, so a KL above target
    raises the penalty and one below lowers it, by at most 20% per horizon.
    num_steps is how many samples (trlx: the batch size) the KL was observed
    over. With target None or 0 it is the fixed controller: coef unchanged.

    Pure: the coefficient is state the loop carries and checkpoints (a float32
    scalar here; `float()` it for a config or a log).
    """
    coef = jnp.asarray(coef, jnp.float32)
    if not target:
        return coef
    if horizon <= 0:
        raise ValueError(f"The adaptive KL controller needs horizon > 0; got {horizon}.")
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * jnp.asarray(num_steps, jnp.float32) / horizon)


def token_rewards_with_kl(
    scores: jax.Array,
    logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    kl_coef: float | jax.Array,
    estimator: str = "k1",
) -> jax.Array:
    """Per-token rewards [N, L]: scores - kl_coef * KL on valid tokens, 0 elsewhere.

    scores carries the task reward on the tokens it is paid on (the last
    completion token for a sparse reward, step ends for a dense one). k1 is
    trlx's choice, the study's: its expectation under the policy is the KL,
    and as a reward it needs no gradient.
    """
    kl = kl_estimate(logp, ref_logp, estimator)
    rewards = scores.astype(jnp.float32) - jnp.asarray(kl_coef, jnp.float32) * kl
    return jnp.where(mask, rewards, 0.0)

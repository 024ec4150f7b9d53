"""Advantages for on-policy updates: GAE over tokens, group baselines, whitening.

Every per-token array is aligned with the tokens of the full sequence layout
(left-padded prompt, completion, right padding): entry t is about token t, and
`mask` marks the completion tokens that are actions. Padding and prompt
entries come out as 0, so nothing downstream has to re-mask them.

Group baselines (GRPO, RLOO, Dr. GRPO) work on one scalar reward per sampled
completion with rows prompt-major (row = prompt * K + k), the sampler's order.
They are registered by name, as tunix's `rl/function_registry.py` registers
its advantage estimators, so a config can name one.

`rollout_advantages` is what an on-policy iteration calls: a rollout batch's
token advantages under the estimator `rl.advantage` names, GAE (the study's
PPO, with the KL penalty in the reward), REINFORCE++ (global whitening, with
or without a group baseline) and every group baseline alike, from one
registry of rollout estimators (`register_rollout_estimator`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from rl_reason.algorithms import kl
from rl_reason.algorithms.registries import registrar


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over tokens, as a reverse `lax.scan`.

    rewards, values, mask: [N, L]; values[:, t] is the value of the state in
    which token t was chosen (the value head shifted right by one). Returns
    (advantages, returns), both [N, L] float32 and 0 where mask is False;
    returns = advantages + values on valid tokens (the critic's target).

    The recursion runs over valid tokens only: the "next" state of a valid
    token is the next valid token of its row, and after the last one the
    episode has ended (value 0). Masked entries pass the carry through
    untouched, so a masked reward or value never enters the result: right
    padding cannot leak a value into the last completion token, and the
    prompt receives nothing. (For the usual contiguous completion this is
    exactly "terminal after the last valid token".) The scan follows
    purejaxrl's `_calculate_gae`, with its `done` flags replaced by the mask.
    """
    mask = mask.astype(bool)
    rewards = jnp.where(mask, rewards.astype(jnp.float32), 0.0)
    values = jnp.where(mask, values.astype(jnp.float32), 0.0)

    def backward_step(carry, step):
        next_advantage, next_value = carry
        reward, value, valid = step
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (
            jnp.where(valid, advantage, next_advantage),
            jnp.where(valid, value, next_value),
        )
        return carry, jnp.where(valid, advantage, 0.0)

    time_major = lambda x: x.swapaxes(0, 1)
    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, advantages = jax.lax.scan(
        backward_step,
        (zeros, zeros),
        (time_major(rewards), time_major(values), time_major(mask)),
        reverse=True,
    )
    advantages = time_major(advantages)
    returns = jnp.where(mask, advantages + values, 0.0)
    return advantages, returns


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over the entries where mask is True (0 when there are none)."""
    weights = mask.astype(jnp.float32)
    return (x.astype(jnp.float32) * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def masked_variance(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance of x over the valid entries (no Bessel correction)."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x.astype(jnp.float32) - mean), mask)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """x scaled to unit variance (and zero mean if shift_mean) over the valid entries.

    The statistics are reductions over the whole array, so under jit on a
    sharded global array they are the global batch's, not one shard's. With
    shift_mean=False the mean is kept (TRL's `whiten`), which scales
    advantages without changing their sign balance. Masked entries are 0.
    """
    mean = masked_mean(x, mask)
    scaled = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(masked_variance(x, mask) + eps)
    if not shift_mean:
        scaled = scaled + mean
    return jnp.where(mask, scaled, 0.0)


def broadcast_to_tokens(sequence_values: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """One value per row [N] -> the same value on every valid token [N, L], 0 elsewhere."""
    return jnp.where(loss_mask, sequence_values.astype(jnp.float32)[:, None], 0.0)


# --- group baselines -------------------------------------------------------

AdvantageEstimator = Callable[[jax.Array, float], jax.Array]
"""groups [P, K] float32, std_floor -> advantages [P, K]."""

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


register_advantage_estimator = registrar(ADVANTAGE_ESTIMATORS, "Advantage estimator")
"""Registers a group estimator under one or more names."""


@register_advantage_estimator("grpo")
def _group_normalised(groups: jax.Array, std_floor: float) -> jax.Array:
    """GRPO (Shao et al. 2024): (r - group mean) / max(group std, std_floor).

    The std is the sample std (ddof=1), as TRL's and tunix's GRPO use. The
    floor, rather than an epsilon added to the std, keeps groups with a tiny
    spread from being blown up without biasing every other group; a group
    whose rewards are all equal gets 0 advantage either way.
    """
    centred = groups - groups.mean(axis=1, keepdims=True)
    std = jnp.std(groups, axis=1, ddof=1, keepdims=True)
    return centred / jnp.maximum(std, std_floor)


@register_advantage_estimator("grpo_no_std", "dr_grpo")
def _group_centred(groups: jax.Array, std_floor: float) -> jax.Array:
    """r - group mean, no division by the std (Dr. GRPO, Liu et al. 2025).

    Dividing by the std up-weights prompts that are nearly always or never
    solved; Dr. GRPO drops it (and the 1/|o| length normalisation, which is
    PPOConfig.loss_aggregation's business, not the advantage's).
    """
    del std_floor
    return groups - groups.mean(axis=1, keepdims=True)


@register_advantage_estimator("rloo")
def _leave_one_out(groups: jax.Array, std_floor: float) -> jax.Array:
    """RLOO (Ahmadian et al. 2024): r_i minus the mean of the other K - 1 rewards.

    r_i - (sum - r_i) / (K - 1) = K / (K - 1) * (r_i - mean): an unbiased
    baseline, because it does not depend on the sample it is subtracted from.
    """
    del std_floor
    k = groups.shape[1]
    others_mean = (groups.sum(axis=1, keepdims=True) - groups) / (k - 1)
    return groups - others_mean


def _groups(rewards: jax.Array, num_samples: int) -> jax.Array:
    if rewards.ndim != 1:
        raise ValueError(f"Expected one reward per row [N]; got shape {rewards.shape}.")
    if num_samples < 2:
        raise ValueError(
            f"Group baselines need num_samples >= 2 completions per prompt; got {num_samples}."
        )
    if rewards.shape[0] % num_samples:
        raise ValueError(
            f"{rewards.shape[0]} rows are not a whole number of groups of {num_samples}"
            " (rows must be prompt-major: row = prompt * K + k)."
        )
    return rewards.astype(jnp.float32).reshape(-1, num_samples)


def group_advantages(
    rewards: jax.Array, num_samples: int, method: str = "grpo", std_floor: float = 1e-6
) -> jax.Array:
    """One advantage per completion [N] from its group of num_samples (K) siblings.

    rewards [N], rows prompt-major (row = prompt * K + k). method names an
    entry of ADVANTAGE_ESTIMATORS: "grpo", "grpo_no_std", "dr_grpo", "rloo".
    """
    if method not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"Unknown advantage estimator {method!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}."
        )
    return ADVANTAGE_ESTIMATORS[method](_groups(rewards, num_samples), std_floor).reshape(-1)


def zero_variance_fraction(rewards: jax.Array, num_samples: int) -> jax.Array:
    """Fraction of groups whose rewards are all equal: they carry no learning signal."""
    groups = _groups(rewards, num_samples)
    return (groups.max(axis=1) == groups.min(axis=1)).astype(jnp.float32).mean()


# --- one rollout batch's advantages, by name: GAE or a group baseline --------


@dataclasses.dataclass(frozen=True)
class EstimatorSettings:
    """The static settings of `rollout_advantages` (the `rl` section's)."""

    num_samples: int = 1  # K completions per prompt, rows prompt-major
    gamma: float = 1.0
    lam: float = 0.95
    kl_estimator: str = "k1"  # the KL paid in GAE's reward
    std_floor: float = 1e-6


RolloutEstimator = Callable[..., dict[str, jax.Array]]
"""(scored, token_scores, sequence_rewards, valid, kl_coef, settings) -> advantages [N, L]
and what else the estimator reports (returns, diagnostics)."""

ROLLOUT_ESTIMATORS: dict[str, RolloutEstimator] = {}


register_rollout_estimator = registrar(ROLLOUT_ESTIMATORS, "Rollout estimator")
"""Registers how a rollout batch becomes token advantages under `rl.advantage=name`."""


def estimator_names() -> list[str]:
    """What `rl.advantage` may name: GAE and every group baseline."""
    return sorted({*ROLLOUT_ESTIMATORS, *ADVANTAGE_ESTIMATORS})


def rollout_advantages(
    estimator: str,
    scored: dict[str, jax.Array],
    token_scores: jax.Array,
    sequence_rewards: jax.Array,
    loss_mask: jax.Array,
    kl_coef: jax.Array,
    settings: EstimatorSettings,
) -> dict[str, jax.Array]:
    """Advantages (and returns) for one rollout batch, with the KL diagnostics.

    `scored` is `ppo.score`'s output (old_logprobs, ref_logprobs, old_values as
    the run has them); token_scores [N, L] the rewards paid at sampled tokens,
    sequence_rewards [N] each completion's total. "gae" is the study's PPO
    (`_gae_with_kl`); any group estimator's name gives each completion its
    group advantage (the KL, if any, is then a loss term).
    """
    valid = loss_mask.at[:, 0].set(False)
    out: dict[str, jax.Array] = {}
    if "ref_logprobs" in scored and "old_logprobs" in scored:  # else the update logs them
        out.update(kl.all_kl_estimates(scored["old_logprobs"], scored["ref_logprobs"], valid))
    fn = ROLLOUT_ESTIMATORS.get(estimator, _group_baseline)
    out.update(fn(scored, token_scores, sequence_rewards, valid, kl_coef, settings, estimator))
    return out


# The estimators that pay kl_coef * KL(policy || reference) in the per-token reward, and so
# need the rollout's own log-probs before the update (`ppo.needs_rollout_logprobs`).
KL_IN_REWARD = ("gae", "reinforce_pp")


def _rewards_with_kl(scored, token_scores, valid, kl_coef, settings):
    """(token rewards minus kl_coef * KL on every completion token, the mean penalty per
    row); the task rewards alone when the run has no reference."""
    if "ref_logprobs" not in scored or "old_logprobs" not in scored:
        return token_scores, jnp.float32(0.0)
    rewards = kl.token_rewards_with_kl(
        token_scores,
        scored["old_logprobs"],
        scored["ref_logprobs"],
        valid,
        kl_coef,
        settings.kl_estimator,
    )
    rows = jnp.maximum(valid.any(axis=1).sum(), 1)
    return rewards, ((token_scores - rewards) * valid).sum() / rows


@register_rollout_estimator("gae")
def _gae_with_kl(scored, token_scores, sequence_rewards, valid, kl_coef, settings, name):
    """The study's PPO: per-token rewards are the task rewards minus kl_coef * KL(policy ||
    reference) on every completion token, then GAE on the value head's values."""
    del sequence_rewards, name  # (GAE's scored always has old_logprobs)
    rewards, penalty = _rewards_with_kl(scored, token_scores, valid, kl_coef, settings)
    advantages, returns = gae(rewards, scored["old_values"], valid, settings.gamma, settings.lam)
    return {"advantages": advantages, "returns": returns, "kl_penalty_mean": penalty}


@register_rollout_estimator("reinforce_pp")
def _reinforce_pp(scored, token_scores, sequence_rewards, valid, kl_coef, settings, name):
    """REINFORCE++ (Hu 2025): each token's discounted return to go (the KL penalty, if
    rl.kl_coef > 0, paid in the reward as PPO's), whitened over the valid tokens of the
    whole batch: a global baseline and scale instead of a critic or a group."""
    del sequence_rewards, name
    rewards, penalty = _rewards_with_kl(scored, token_scores, valid, kl_coef, settings)
    returns, _ = gae(rewards, jnp.zeros(rewards.shape, jnp.float32), valid, settings.gamma, 1.0)
    return {"advantages": whiten(returns, valid), "kl_penalty_mean": penalty}


@register_rollout_estimator("reinforce_pp_baseline")
def _reinforce_pp_baseline(scored, token_scores, sequence_rewards, valid, kl_coef, settings, name):
    """REINFORCE++-baseline: each completion's reward minus its group's mean (no division
    by the group's std), then whitened over the valid tokens of the whole batch. The KL
    is then a loss term (ppo.kl_loss_coef, k2 in its configs), as OpenRLHF pairs them."""
    del scored, token_scores, kl_coef, name
    k = settings.num_samples
    centred = group_advantages(sequence_rewards, k, "grpo_no_std", settings.std_floor)
    return {
        "advantages": whiten(broadcast_to_tokens(centred, valid), valid),
        "zero_variance_groups": zero_variance_fraction(sequence_rewards, k),
    }


def _group_baseline(scored, token_scores, sequence_rewards, valid, kl_coef, settings, name):
    """Each completion's total reward against its K-1 siblings', on its tokens."""
    del scored, token_scores, kl_coef
    k = settings.num_samples
    advantages = group_advantages(sequence_rewards, k, name, settings.std_floor)
    return {
        "advantages": broadcast_to_tokens(advantages, valid),
        "zero_variance_groups": zero_variance_fraction(sequence_rewards, k),
    }

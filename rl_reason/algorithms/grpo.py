"""GRPO, RLOO and Dr. GRPO: PPO's update with group baselines instead of a critic.

There is no separate GRPO step. A group estimator (advantages.py) turns the
K rewards of each prompt into one advantage per completion, broadcast to its
tokens; `ppo.ppo_update` with a config from here (no value, KL as a loss
term, the method's loss aggregation) does the rest, so clipping, epochs,
minibatches, micro-batches and sharding are shared with PPO.

  advantages = group_token_advantages(rewards, seqs["loss_mask"], K, "grpo")
  scored = ppo.score(models, params, ref_params, seqs)
  state, metrics = update(state, {**seqs, **scored, "advantages": advantages})
"""

from __future__ import annotations

import jax

from rl_reason.algorithms.advantages import broadcast_to_tokens, group_advantages
from rl_reason.algorithms.ppo import PPOConfig


def group_token_advantages(
    rewards: jax.Array,
    loss_mask: jax.Array,
    num_samples: int,
    method: str = "grpo",
    std_floor: float = 1e-6,
) -> jax.Array:
    """[N, L] token advantages: each completion's group advantage on its completion tokens.

    rewards [N] with rows prompt-major (row = prompt * K + k); method is
    "grpo", "grpo_no_std", "dr_grpo" or "rloo" (advantages.ADVANTAGE_ESTIMATORS).
    """
    return broadcast_to_tokens(
        group_advantages(rewards, num_samples, method, std_floor), loss_mask
    )


# Group advantages are already normalised within each prompt's group;
# whitening over the batch would shift the zero of groups that carry no
# signal, so it is off.
_GROUP_BASELINE = dict(
    use_value=False,
    vf_coef=0.0,
    value_clip=0.0,
    whiten_advantages=False,
    kl_loss_coef=0.04,  # tunix's GRPO beta
    kl_estimator="k3",
)


def grpo_ppo_config(**overrides) -> PPOConfig:
    """GRPO (Shao et al. 2024): no critic, k3 KL loss (beta 0.04), sequence-mean of token-means.

    Also the config for RLOO (group_token_advantages(..., method="rloo")).
    """
    return PPOConfig(**{**_GROUP_BASELINE, "loss_aggregation": "seq_mean_token_mean", **overrides})


def dr_grpo_ppo_config(**overrides) -> PPOConfig:
    """Dr. GRPO (Liu et al. 2025): token sums over a constant length instead of per-sequence means.

    Pair it with method="dr_grpo" (no std division). Set aggregation_length
    to the generation budget to match the paper's constant (the default, the
    batch's sequence length, only rescales the loss). The paper trains
    without a KL term; the beta here is tunix's DrGRPOConfig default
    (inherited from its GRPO), so pass kl_loss_coef=0.0 for the paper's setup.
    """
    return PPOConfig(
        **{**_GROUP_BASELINE, "loss_aggregation": "seq_mean_token_sum_norm", **overrides}
    )

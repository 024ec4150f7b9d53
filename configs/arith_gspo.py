"""GSPO (Zheng et al. 2025) on the synthetic arithmetic task, from configs/arith_start.py's start.

    python launch/train.py --config=configs/arith_gspo.py --workdir=runs/gspo \
        --config.model_source.path=runs/sft

GRPO's group advantages with a sequence-level importance ratio (the geometric
mean of the token ratios) clipped as a whole, in the paper's narrow band
[1 - 3e-4, 1 + 4e-4], and the mean over sequences. ppo.policy_loss="gspo_token"
is the token form (the same update when, as here, a row has one advantage).
No KL term, as the paper and verl's recipe.
"""

from configs import arith_grpo


def get_config():
    """arith_grpo with GSPO's sequence-level ratio and clip."""
    config = arith_grpo.get_config()
    config.algorithm = "gspo"
    config.ppo.update(
        policy_loss="gspo",
        clip_eps=3e-4,
        clip_eps_high=4e-4,
        loss_aggregation="seq_mean_token_mean",
        kl_loss_coef=0.0,
    )
    return config

"""GSPO (Zheng et al. 2025) on the synthetic arithmetic task, from configs/arith_start.py's start.

    python launch/train.py --config=configs/arith_gspo.py --workdir=runs/gspo \
        --config.model_source.path=runs/sft

GRPO's group advantages with a sequence-level importance ratio (the geometric
mean of the token ratios) clipped as a whole, in the paper's narrow band
[1 - 3e-4, 1 + 4e-4], and the mean over sequences. ppo.policy_loss="gspo_token"
is the token form (the same update when, as here, a row has one advantage).
No KL term, as the paper and verl's recipe.
"""

from configs import arith_ppo
from rl_reason.experiments.config import with_objective


def get_config():
    """arith_ppo's sizes with GSPO's sequence-level ratio and clip."""
    return with_objective(arith_ppo.get_config(), "gspo")

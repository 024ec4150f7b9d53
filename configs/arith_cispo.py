"""CISPO (MiniMax-M1, 2025) on the synthetic arithmetic task, from configs/arith_start.py's start.

    python launch/train.py --config=configs/arith_cispo.py --workdir=runs/cispo \
        --config.model_source.path=runs/sft

GRPO's group advantages; the policy term is REINFORCE weighted by the token
ratio clipped to at most 1 + 0.28 and stopped from the gradient, so no token
loses its gradient to the clip. No lower bound on the weight (clip_eps 1: the
paper sets its lower epsilon large and tunes only the upper one); the
token-level loss and no KL term, as the paper.
"""

from configs import arith_ppo
from rl_reason.experiments.config import with_objective


def get_config():
    """arith_ppo's sizes with CISPO's clipped, stop-gradient importance weight."""
    return with_objective(arith_ppo.get_config(), "cispo")

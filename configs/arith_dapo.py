"""DAPO (Yu et al. 2025) on the synthetic arithmetic task, from the SFT start of configs/arith_start.py.

    python launch/train.py --config=configs/arith_dapo.py --workdir=runs/dapo \
        --config.model_source.path=runs/sft

GRPO's group advantages with DAPO's four parts, each its own switch (turn any
off to see what it does): clip-higher (ppo.clip_eps_high 0.28 above clip_eps
0.2), dynamic sampling (rl.dynamic_sampling: groups with equal rewards leave
the batch, more prompts are drawn to refill it), the token-level loss
(ppo.loss_aggregation="token_mean") and overlong reward shaping over the last
8 of the 48 budget tokens (rl.overlong_buffer). No KL term, as the paper and
verl's recipe.
"""

from configs import arith_ppo
from rl_reason.experiments.config import with_objective


def get_config():
    """arith_ppo's sizes with DAPO's clip-higher, dynamic sampling, token-level loss, overlong shaping."""
    return with_objective(arith_ppo.get_config(), "dapo")

"""GRPO on the built-in synthetic arithmetic task, from the SFT start of configs/arith_start.py.

    python launch/train.py --config=configs/arith_grpo.py --workdir=runs/grpo \
        --config.model_source.path=runs/sft

Group advantages over the K samples of each prompt (--config.rl.advantage=rloo
or dr_grpo for the variants), no critic, the KL to the reference as a k3 loss
term (beta 0.04, tunix's default).
"""

from configs import arith_ppo
from rl_reason.experiments.config import with_objective


def get_config():
    """arith_ppo's sizes, with GRPO's advantages and losses (grpo.grpo_ppo_config)."""
    return with_objective(arith_ppo.get_config(), "grpo")

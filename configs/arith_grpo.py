"""GRPO on the built-in synthetic arithmetic task, from the SFT start of configs/arith_start.py.

    python launch/train.py --config=configs/arith_grpo.py --workdir=runs/grpo \
        --config.model_source.path=runs/sft

Group advantages over the K samples of each prompt (--config.rl.advantage=rloo
or dr_grpo for the variants), no critic, the KL to the reference as a k3 loss
term (beta 0.04, tunix's default).
"""

import dataclasses

from configs import arith_ppo
from rl_reason.algorithms.grpo import grpo_ppo_config


def get_config():
    """arith_ppo's sizes, with GRPO's advantages and losses (grpo.grpo_ppo_config)."""
    config = arith_ppo.get_config()
    config.algorithm = "grpo"
    config.rl.update(advantage="grpo", kl_coef=0.0)  # the KL is a loss term instead
    ppo = config.ppo
    config.ppo.update(
        dataclasses.asdict(
            grpo_ppo_config(num_epochs=ppo.num_epochs, num_minibatches=ppo.num_minibatches)
        )
    )
    return config

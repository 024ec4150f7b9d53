"""REINFORCE++ (Hu 2025) on the synthetic arithmetic task, from configs/arith_start.py's start.

    python launch/train.py --config=configs/arith_reinforce_pp.py --workdir=runs/reinforce_pp \
        --config.model_source.path=runs/sft

REINFORCE++-baseline: each completion's reward minus its group's mean, then
whitened over every valid token of the batch (no critic, no per-group std),
the KL to the reference as a k2 loss term per token (coefficient 1e-3, as
OpenRLHF's examples pair them). --config.rl.advantage=reinforce_pp is the form
without a group baseline (returns to go, whitened over the batch; with
--config.rl.kl_coef > 0 the KL is paid in the reward instead).
"""

from configs import arith_ppo
from rl_reason.experiments.config import with_objective


def get_config():
    """arith_ppo's sizes with REINFORCE++-baseline advantages and a k2 KL loss."""
    return with_objective(arith_ppo.get_config(), "reinforce_pp")

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

from configs import arith_grpo


def get_config():
    """arith_grpo with DAPO's clip-higher, dynamic sampling, token-level loss, overlong shaping."""
    config = arith_grpo.get_config()
    config.algorithm = "dapo"
    config.rl.update(dynamic_sampling=True, max_refill_rounds=8, overlong_buffer=8)
    config.ppo.update(clip_eps_high=0.28, loss_aggregation="token_mean", kl_loss_coef=0.0)
    return config

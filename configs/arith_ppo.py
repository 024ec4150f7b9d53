"""PPO on the built-in synthetic arithmetic task, from an SFT run of configs/sft_synthetic.py.

    python launch/train.py --config=configs/sft_synthetic.py --workdir=runs/sft
    python launch/train.py --config=configs/arith_ppo.py --workdir=runs/ppo \
        --config.model_source.path=runs/sft

The study's PPO (sparse +1 reward, KL 0.05 in the reward, gamma 1, lambda
0.95, clip 0.2) at a size a laptop CPU runs in minutes.
"""

from rl_reason.experiments.config import rl_config


def get_config():
    config = rl_config("ppo")
    config.model_source.path = "runs/sft"
    config.rl.update(
        num_iterations=30,
        prompts_per_iteration=16,
        num_samples=4,
        max_new_tokens=48,
        temperature=1.0,
        prompt_buckets=(128,),
        eval_every=10,
    )
    config.ppo.update(num_epochs=2, num_minibatches=2, vf_coef=0.5, entropy_coef=0.0)
    config.optim.lr = 2e-5
    return config

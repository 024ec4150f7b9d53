"""PPO on the built-in synthetic arithmetic task, from the SFT start of configs/arith_start.py.

    python launch/train.py --config=configs/arith_start.py --workdir=runs/sft
    python launch/train.py --config=configs/arith_ppo.py --workdir=runs/ppo \
        --config.model_source.path=runs/sft

The study's PPO (sparse +1 reward, KL 0.05 in the reward, gamma 1, lambda
0.95, clip 0.2) at a size a laptop CPU runs in minutes: 40 iterations of 32
prompts x 8 samples at temperature 1, one epoch of two minibatches at lr
1e-4; held-out maj@1 on 256 test questions at the start and every 10
iterations. The start is `configs/arith_start.py` (a mid-schedule SFT
checkpoint); what these settings do from a fully annealed SFT model is in
docs/results-synthetic.md.
"""

from rl_reason.experiments.config import rl_config


def get_config():
    config = rl_config("ppo")
    config.model_source.path = "runs/sft"
    config.rl.update(
        num_iterations=40,
        prompts_per_iteration=32,
        num_samples=8,
        max_new_tokens=48,
        temperature=1.0,
        eval_every=10,
    )
    config.sampling.update(batch_size=32, prompt_buckets=(128,))
    config.ppo.update(num_epochs=1, num_minibatches=2, vf_coef=0.5, entropy_coef=0.0)
    config.eval.num_examples = 256
    config.optim.lr = 1e-4
    return config

"""GRPO on the built-in synthetic arithmetic task, from an SFT run of configs/sft_synthetic.py.

    python launch/train.py --config=configs/arith_grpo.py --workdir=runs/grpo \
        --config.model_source.path=runs/sft

Group advantages over the K samples of each prompt (--config.rl.advantage=rloo
or dr_grpo for the variants), no critic, the KL to the reference as a k3 loss
term (beta 0.04, tunix's default).
"""

from rl_reason.experiments.config import rl_config


def get_config():
    config = rl_config("grpo")
    config.model_source.path = "runs/sft"
    config.rl.update(
        num_iterations=30,
        prompts_per_iteration=16,
        num_samples=4,
        max_new_tokens=48,
        temperature=1.0,
        prompt_buckets=(128,),
        eval_every=10,
        advantage="grpo",
        kl_coef=0.0,
    )
    config.ppo.update(
        use_value=False,
        vf_coef=0.0,
        value_clip=0.0,
        whiten_advantages=False,
        kl_loss_coef=0.04,
        kl_estimator="k3",
        loss_aggregation="seq_mean_token_mean",
        num_epochs=2,
        num_minibatches=2,
    )
    config.optim.lr = 2e-5
    return config

"""Expert Iteration on the built-in synthetic arithmetic task, from an SFT run.

    python launch/train.py --config=configs/arith_ei.py --workdir=runs/ei \
        --config.model_source.path=runs/sft

K samples per train question at temperature 1, keep the correct ones, fine-tune
the start model on everything kept so far, choose each round's checkpoint by
validation maj@1; CPU-sized (the study: K=96, 5 rounds).
"""

from rl_reason.experiments.config import ei_config


def get_config():
    config = ei_config()
    config.model_source.path = "runs/sft"
    config.data.update(num_train=512, num_validation=64, num_eval=128)
    config.ei.update(
        num_rounds=3,
        num_samples=4,
        max_new_tokens=48,
        sampling_batch_size=32,
        sampling_chunk=128,
        prompt_buckets=(64, 128),
        steps_per_round=150,
        eval_every=50,
    )
    config.train.update(batch_size=32, max_length=128)
    config.optim.update(lr=1e-3, warmup_steps=10)
    return config

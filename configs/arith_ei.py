"""Expert Iteration on the built-in synthetic arithmetic task, from an SFT run.

    python launch/train.py --config=configs/arith_start.py --workdir=runs/sft
    python launch/train.py --config=configs/arith_ei.py --workdir=runs/ei \
        --config.model_source.path=runs/sft

K samples per train question at temperature 1, keep the correct ones, fine-tune
the start model on everything kept so far, choose each round's checkpoint by
validation maj@1 (64 questions); held-out maj@1 on 256 test questions at the
start and after every round. CPU-sized (the study: K=96, 5 rounds). From a
mid-schedule start like `configs/arith_start.py`'s, lr 1e-3 with K=4 gave only
+3-5 points (the fine-tuning re-heats a start whose learning rate had come
down to about 7.75e-4); 3e-4 with K=8 gave +8.6 after the first round (docs/results-synthetic.md).
"""

from rl_reason.experiments.config import ei_config


def get_config():
    config = ei_config()
    config.model_source.path = "runs/sft"
    config.data.update(num_train=512, num_validation=64, num_eval=256)
    config.ei.update(
        num_rounds=3,
        num_samples=8,
        max_new_tokens=48,
        steps_per_round=150,
        eval_every=50,
    )
    config.sampling.update(batch_size=32, chunk=128, prompt_buckets=(64, 128))
    config.train.update(batch_size=32, max_length=128)
    config.optim.update(lr=3e-4, warmup_steps=10)
    config.eval.num_examples = 256
    return config

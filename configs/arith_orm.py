"""An outcome reward model (ORM) on the built-in synthetic arithmetic task, from an SFT run.

    python launch/train.py --config=configs/arith_start.py --workdir=runs/sft      # the policy
    python launch/train.py --config=configs/arith_orm.py --workdir=runs/orm \
        --config.model_source.path=runs/sft
    python launch/evaluate.py --config=configs/synthetic_eval.py --workdir=runs/eval_orm \
        --config.model_source.path=runs/sft --config.eval.orm_source=runs/orm   # rerank@K

K=4 samples per train question at temperature 1 from the SFT policy, labelled
by final-answer correctness; the ORM (a scalar head on the SFT model) is
trained with class-balanced per-token BCE and measured on K=4 samples of 128
held-out questions at temperature 0.7: AUC, accuracy at 0.5, rerank@4 against
maj@4. CPU-sized (the study: K=96 per GSM8K question, a 7B ORM).
"""

from rl_reason.experiments.config import orm_config


def get_config():
    config = orm_config()
    config.model_source.path = "runs/sft"
    config.data.update(num_train=1024, num_eval=128)
    config.orm.update(
        num_samples=4,
        max_new_tokens=48,
        sampling_batch_size=32,
        sampling_chunk=256,
        prompt_buckets=(64, 128),
        score_batch_size=32,
    )
    config.eval.update(num_examples=128, num_samples=4, max_new_tokens=48)
    config.train.update(num_steps=300, batch_size=32, max_length=128, eval_every=100)
    config.optim.update(lr=1e-4, warmup_steps=20, schedule="cosine")
    return config

"""An outcome reward model (ORM) on the built-in synthetic arithmetic task, from an SFT run.

    python launch/train.py --config=configs/arith_start.py --workdir=runs/sft      # the policy
    python launch/train.py --config=configs/arith_orm.py --workdir=runs/orm \
        --config.model_source.path=runs/sft
    python launch/evaluate.py --config=configs/synthetic_eval.py --workdir=runs/eval_orm \
        --config.model_source.path=runs/sft --config.eval.orm_source=runs/orm   # rerank@K

K=8 samples per train question (4,096 of them) at temperature 1 from the SFT
policy, labelled by final-answer correctness; the ORM (a scalar head on the
SFT model) is trained with class-balanced per-token BCE on the questions
whose samples disagree, as many right as wrong, plus one sample of each other
question (`orm.balance_questions`); 512 questions held back from the train
split choose the ORM by the within-question AUC of their samples, and it is
measured on K=4 samples of 1,024 held-out questions at temperature 0.7: AUC,
accuracy at 0.5, rerank@4 against maj@4. CPU-sized (the study: K=96 per GSM8K
question, a 7B ORM). Why the balancing and the selection: docs/results-synthetic.md,
"The outcome reward model".
"""

from rl_reason.experiments.config import orm_config


def get_config():
    config = orm_config()
    config.model_source.path = "runs/sft"
    config.data.update(num_train=4096, num_validation=512, num_eval=1024)
    config.orm.update(
        num_samples=8,
        max_new_tokens=48,
        score_batch_size=32,
        balance_questions=True,
        one_sided_samples=1,
    )
    config.sampling.update(batch_size=32, chunk=1024, prompt_buckets=(64, 128))
    config.eval.update(num_examples=1024, num_samples=4, max_new_tokens=48)
    config.train.update(num_steps=1000, batch_size=32, max_length=128, eval_every=100)
    config.optim.update(lr=3e-4, warmup_steps=20, schedule="cosine")
    return config

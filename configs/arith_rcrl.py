"""Return-Conditioned RL on the built-in synthetic arithmetic task, from an SFT run.

    python launch/train.py --config=configs/arith_start.py --workdir=runs/sft
    python launch/train.py --config=configs/arith_rcrl.py --workdir=runs/rcrl \
        --config.model_source.path=runs/sft
    python launch/train.py --config=configs/arith_rcrl.py --workdir=runs/rcrl_dense \
        --config.model_source.path=runs/sft --config.rcrl.mode=dense
    python launch/evaluate.py --config=configs/synthetic_eval.py --workdir=runs/rcrl_eval \
        --config.model_source.path=runs/rcrl      # conditions on <|good|> by itself

Each round: K samples per train question at temperature 1 (round 0 from the
SFT model as it is, later rounds conditioned on <|good|>), every sample
labelled <|good|> or <|bad|> by the correctness of its answer (dense: one
label per step from the step-match reward, the answer line by correctness),
fine-tune on all of them, choose the round's checkpoint by validation maj@1
conditioned on <|good|>; CPU-sized.
"""

from rl_reason.experiments.config import rcrl_config


def get_config():
    config = rcrl_config()
    config.model_source.path = "runs/sft"
    config.data.update(num_train=512, num_validation=64, num_eval=128)
    config.rcrl.update(
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

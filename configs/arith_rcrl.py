"""Return-Conditioned RL on the built-in synthetic arithmetic task, from an SFT run.

    python launch/train.py --config=configs/arith_two_styles_start.py --workdir=runs/sft2
    python launch/train.py --config=configs/arith_rcrl.py --workdir=runs/rcrl \
        --config.model_source.path=runs/sft2
    python launch/train.py --config=configs/arith_rcrl.py --workdir=runs/rcrl_dense \
        --config.model_source.path=runs/sft2 --config.rcrl.mode=dense
    python launch/evaluate.py --config=configs/synthetic_eval.py --workdir=runs/rcrl_eval \
        --config.model_source.path=runs/rcrl      # conditions on <|good|> by itself

Each round: K samples per train question at temperature 1 (round 0 from the
SFT model as it is, later rounds conditioned on <|good|>), every sample
labelled <|good|> or <|bad|> by the correctness of its answer (dense: one
label per step from the step-match reward, the answer line by correctness),
fine-tune on all of them, choose the round's checkpoint by validation maj@1
conditioned on <|good|>; held-out maj@1 under <|good|> and under <|bad|> on
256 test questions after every round. CPU-sized (about 7 minutes here on
eight virtual devices).

Its start is `configs/arith_two_styles_start.py`, whose good and bad samples
differ in the way they answer (worked out or bare); from `arith_start.py`,
whose samples differ by arithmetic slips only, no RCRL setting tried moved
maj@1 or separated the two tokens. From this start (2026-12-02) maj@1 under
<|good|> ends 9.4, 12.9 and 10.2 points above the start over three seeds on
eight devices, 5.9 for seed 0 on one, and stays above maj@1 under <|bad|>
after every round (docs/results-synthetic.md, "Return-Conditioned RL").
The return tokens' rows learn 100x faster than the rest
(`rcrl.return_token_lr_scale`); at 1x the model ignores the token.
"""

from rl_reason.experiments.config import rcrl_config


def get_config():
    config = rcrl_config()
    config.model_source.path = "runs/sft2"
    config.data.update(num_train=512, num_validation=64, num_eval=256)
    config.rcrl.update(
        num_rounds=3,
        num_samples=8,
        max_new_tokens=48,
        steps_per_round=300,
        eval_every=100,
        return_token_lr_scale=100.0,
    )
    config.sampling.update(batch_size=32, chunk=128, prompt_buckets=(64, 128))
    config.train.update(batch_size=32, max_length=128)
    config.optim.update(lr=3e-4, warmup_steps=10)
    config.eval.num_examples = 256
    return config

"""The study in miniature: the default job of `python launch/train.py`.

    python launch/train.py                                 # writes runs/default/report.md
    python launch/train.py --workdir=runs/mini --config.study.seeds=0,1,2

Havrilla et al. (2024) at laptop scale on the built-in synthetic arithmetic
task, with no download and no accelerator: a small Llama-style model (0.8M
parameters) pretrained on arithmetic text, fine-tuned on the reference
solutions (the SFT start), then Expert Iteration, PPO and Return-Conditioned
RL from the SFT start with the sparse reward, EI and PPO from the pretrained
start, PPO with the dense step-match reward beside its sparse twin, an ORM
for rerank@K, and every model evaluated on the same held-out questions with
K=16. `experiments/study.py` says what each stage is; docs/study.md (and the
README) shows a run's report. Every stage resumes: kill the job and rerun
the same command.
"""

from configs import sft_synthetic
from rl_reason.experiments.config import study_config


def get_config():
    config = study_config()
    config.study.runs = (
        "sft:ei:sparse",
        "sft:ppo:sparse",
        "sft:ppo:dense",
        "sft:rcrl:sparse",
        "pretrained:ei:sparse",
        "pretrained:ppo:sparse",
    )
    stages = config.stages

    # Language modelling on 8,000 documents of arithmetic text (stories, drills,
    # answer keys): about 16% maj@1 on the task, answering in the answer keys' styles.
    pretrain = sft_synthetic.get_config()
    pretrain.data.update(task="synthetic_text", num_train=8000, num_eval=256)
    pretrain.train.update(num_steps=400, eval_every=400)
    stages.pretrain = pretrain

    # SFT on the reference solutions, stopped mid-schedule (as configs/arith_start.py).
    stages.sft.data.update(num_train=4000, num_eval=256)
    stages.sft.train.update(num_steps=200, eval_every=200)
    stages.sft.optim.update(lr=1e-3, final_lr_fraction=0.775)

    rl_data = dict(num_train=512, num_validation=64, num_eval=128)
    # Decode batches shrink to 32 rows at the least, not 8: every smaller batch is one
    # more decode step to compile (1.5-2 s each at 200 GFLOP/s); the samples are the same
    # and the evaluations took no longer (BENCHMARKS.md, "Fewer programs to compile").
    sampling = dict(batch_size=32, prompt_buckets=(64, 128), chunk=512, min_rows=32)

    stages.orm.data.update(num_train=512, num_validation=0, num_eval=128)
    stages.orm.orm.update(
        num_samples=4, max_new_tokens=48, balance_questions=True, one_sided_samples=1
    )
    stages.orm.sampling.update(**sampling)
    stages.orm.train.update(num_steps=200, batch_size=32, eval_every=200)
    stages.orm.eval.update(num_examples=128, num_samples=4, max_new_tokens=48)
    stages.orm.optim.update(lr=3e-4, schedule="cosine", warmup_steps=20)

    stages.ei.data.update(**rl_data)
    stages.ei.ei.update(
        num_rounds=2, num_samples=4, steps_per_round=80, eval_every=40, max_new_tokens=48
    )
    stages.ei.sampling.update(**sampling)
    stages.ei.optim.update(lr=3e-4, warmup_steps=10)
    stages.ei.eval.update(num_examples=128, max_new_tokens=48)

    stages.ppo.data.update(num_train=512, num_eval=128)
    stages.ppo.rl.update(
        num_iterations=12, prompts_per_iteration=32, num_samples=8, temperature=1.0,
        eval_every=6, max_new_tokens=48,
    )
    stages.ppo.sampling.update(batch_size=32, prompt_buckets=(128,), min_rows=32)
    stages.ppo.ppo.update(num_epochs=1, num_minibatches=2, vf_coef=0.5, entropy_coef=0.0)
    stages.ppo.optim.lr = 1e-4
    stages.ppo.eval.update(num_examples=128, max_new_tokens=48)

    stages.rcrl.data.update(**rl_data)
    stages.rcrl.rcrl.update(
        num_rounds=1, num_samples=4, steps_per_round=100, eval_every=50, max_new_tokens=48,
        eval_bad_token=False,
    )
    stages.rcrl.sampling.update(**sampling)
    stages.rcrl.optim.update(lr=3e-4, warmup_steps=10)
    stages.rcrl.eval.update(num_examples=128, max_new_tokens=48)

    stages.eval.eval.update(
        num_examples=128, num_samples=16, ks=(1, 2, 4, 8, 16), temperature=0.7,
        max_new_tokens=48,
    )
    stages.eval.sampling.update(prompt_buckets=(64, 128), min_rows=32)
    for stage in stages.values():
        stage.logging.progress_bar = False
    return config

"""The study's full grid on the synthetic task: both starts x EI/PPO/RCRL x sparse/dense/ORM,
three seeds, K=96.

    python launch/train.py --config=configs/study.py --workdir=runs/study

`configs/study_mini.py` (the default job) with every run the study compares
and its evaluation protocol: K=96 samples per held-out question (the
study's K) on 512 questions, each RL run three times (seeds 0, 1, 2; the
table shows mean ± standard deviation), and longer RL budgets: Expert
Iteration with K=96 samples per train question over 3 rounds (the study:
K=96, up to 5 rounds), PPO for 48 iterations. Hours on a laptop CPU (the
ORM and the evaluations at K=96 are the longest stages); every stage
resumes, so it can run across sessions.
"""

from configs import study_mini


def get_config():
    config = study_mini.get_config()
    config.study.runs = tuple(
        f"{start}:{run}"
        for start in ("sft", "pretrained")
        for run in (
            "ei:sparse",
            "ppo:sparse",
            "ppo:dense",
            "ppo:orm",
            "rcrl:sparse",
            "rcrl:dense",
        )
    )
    config.study.seeds = (0, 1, 2)
    stages = config.stages
    stages.ei.ei.update(num_rounds=3, num_samples=96, steps_per_round=200)
    stages.ei.sampling.samples_per_call = 32
    stages.rcrl.rcrl.update(num_rounds=3, num_samples=8, steps_per_round=200)
    stages.ppo.rl.update(num_iterations=48, eval_every=8)
    for name in ("ei", "ppo", "rcrl"):
        stages[name].eval.num_examples = 256
    stages.eval.eval.update(
        num_examples=512, num_samples=96, ks=(1, 2, 4, 8, 16, 32, 64, 96)
    )
    stages.eval.sampling.chunk = 64
    return config

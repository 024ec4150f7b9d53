"""Peak resident memory of one Expert Iteration round on Gemma 3 270M, on one CPU device.

    RL_REASON_DATA_DIR=../shared/data python benchmarks/gemma3_270m_ei_memory.py
    RL_REASON_DATA_DIR=../shared/data python benchmarks/gemma3_270m_ei_memory.py \
        --set lora.rank=16 --set lora.alpha=32.0

One round of configs/gemma3_270m_svamp_ei.py as `launch/train.py` runs it
(`expert_iteration.train`, in a temporary workdir): the real weights from the
GGUF package, the start evaluated on held-out questions, K samples of every
train question (4-shot prompts), the kept solutions accumulated, SFT steps
with validation picking the round's model, the chosen model measured. Fewer
questions than the real round (the first `--train` train questions, the last
8 of them validating, `--heldout` held-out ones) and `--steps` SFT steps:
what a round holds in memory does not grow with the number of questions, and
the SFT steps' shapes are the config's (batch 8 x 256 tokens, remat "full");
every sample is kept (`ei.threshold = 0`), so that the round always trains.
The round's peak is in its SFT steps (full fine-tuning: the params, AdamW's
two moments, the gradients, the chosen model and the start kept for the next
round). `--set key=value` overrides the config as in gemma3_270m_ppo_memory.py.
Prints one JSON line: the process's peak RSS, seconds, load average before and
after, what the round kept and logged.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

# benchlib sets this checkout's path first.
from benchlib import load_average, override, peak_rss_bytes

from configs import gemma3_270m_svamp_ei
from rl_reason.experiments import expert_iteration, tasks

GB = 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=40, help="train questions (8 validate)")
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="SFT steps of the round")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    args = parser.parse_args()

    config = gemma3_270m_svamp_ei.get_config()
    config.data.num_validation = 8
    config.ei.threshold = 0.0  # every sample kept: the round always trains (a memory run)
    config.ei.update(num_rounds=1, steps_per_round=args.steps, eval_every=args.steps)
    config.eval.num_examples = args.heldout
    config.checkpoint.update(save_interval_steps=1000)
    config.logging.update(progress_bar=False, tensorboard=False)
    for assignment in args.set:
        override(config, assignment)

    load = tasks._load  # the first --train questions of the split: a shorter sampling phase
    tasks._load = lambda c: (lambda t: tasks.Task(t.train[: args.train], t.heldout))(load(c))
    load_before, clock = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        last = expert_iteration.train(config, workdir)
    print(
        json.dumps(
            {
                "lora_rank": int(config.lora.rank),
                "train_questions": args.train,
                "samples_per_question": int(config.ei.num_samples),
                "sft_steps": args.steps,
                "batch_x_length": [int(config.train.batch_size), int(config.train.max_length)],
                "remat": config.train.remat,
                "peak_rss_gb": round(peak_rss_bytes() / GB, 2),
                "seconds": round(time.perf_counter() - clock, 1),
                "load_average": [load_before, load_average()],
                "dataset_size": last.get("dataset_size"),
                "heldout_maj@1": last.get("heldout/maj@1"),
                "overrides": args.set,
            }
        )
    )


if __name__ == "__main__":
    main()

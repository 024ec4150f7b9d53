"""Peak resident memory of one PPO iteration on Gemma 3 270M, on one CPU device.

    RL_REASON_DATA_DIR=../shared/data python benchmarks/gemma3_270m_ppo_memory.py
    RL_REASON_DATA_DIR=../shared/data python benchmarks/gemma3_270m_ppo_memory.py \
        --set ppo.num_minibatches=1 --set ppo.chunk_size=64

The iteration of configs/gemma3_270m_svamp_ppo.py, built as experiments/on_policy.py
builds it (benchlib.OnPolicyIteration): the real weights from the GGUF package,
a value head added to the policy, the frozen reference; the config's first 8
SVAMP train questions x 4 samples of 128 new tokens, sampled with no EOS and
no stop string so that every row is the budget's 128 + 128 = 256 tokens (the
shapes, and the memory, are the worst case); rewards, policy/reference
log-probs and values, GAE with the KL penalty, `ppo_update` (the config's
epochs x minibatches). `--set key=value` overrides the config (dotted keys,
Python literals). Prints one JSON line: the process's peak RSS (import
included) after loading the model, after creating the train state and after
each phase, the phase times, the load average before and after, and the
iteration's loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

# benchlib sets this checkout's path first.
from benchlib import OnPolicyIteration, load_average, override, peak_rss_bytes

from configs import gemma3_270m_svamp_ppo
from rl_reason.data import templates
from rl_reason.experiments import sources, tasks
from rl_reason.experiments.config import validate_rl
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose

GB = 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    args = parser.parse_args()

    config = gemma3_270m_svamp_ppo.get_config()
    for assignment in args.set:
        override(config, assignment)
    validate_rl(config, num_devices=1)
    rl = config.rl
    mesh = mesh_lib.make_mesh(tuple(config.mesh.shape), devices=jax.devices()[:1])
    rules = shd.rules_from_config(config.mesh.rules)

    rss = {}
    load_before = load_average()  # RSS does not move with load, but the phase times do

    def record(name: str) -> None:
        rss[name] = peak_rss_bytes()
        print(f"peak RSS after {name}: {rss[name] / GB:.2f} GB", file=sys.stderr, flush=True)

    examples = tasks.load(config).train[: rl.prompts_per_iteration]
    prompts = [templates.format_prompt(ex["question"]) for ex in examples]
    start = sources.load_model(config.model_source.kind, config.model_source.path, mesh, rules)
    record("load")
    iteration = OnPolicyIteration(
        config, start, mesh, rules, compose.compose(rl.rewards.to_dict()), full_length=True
    )
    del start  # the reference params live on in the iteration
    times = []
    record("state")
    for index in range(args.iterations):
        clock = time.perf_counter()
        phases = iteration(
            examples, prompts, index, on_phase=lambda name, i=index: record(f"{name}_{i}")
        )
        times.append({**phases, "total": time.perf_counter() - clock})
    pc = iteration.pc
    print(
        json.dumps(
            {
                "rows": f"{rl.prompts_per_iteration} x {rl.num_samples}",
                "sequence_length": iteration.last["sequence_length"],
                "generated_tokens": iteration.last["generated_tokens"],
                "remat": iteration.models.policy.config.remat,
                "chunk": pc.chunk_size,
                "epochs_x_minibatches_x_micro": [
                    pc.num_epochs,
                    pc.num_minibatches,
                    pc.num_microbatches,
                ],
                "params_m": iteration.models.policy.config.num_params() / 1e6,
                "peak_rss_gb": peak_rss_bytes() / GB,
                "peak_rss_gb_after": {k: round(v / GB, 2) for k, v in rss.items()},
                "seconds": times,
                "load_average": [load_before, load_average()],  # before, after
                "loss": iteration.last["loss"],
                "finite": iteration.last["finite"],
                "overrides": args.set,
            }
        )
    )


if __name__ == "__main__":
    main()

"""SFT step time against a PyTorch training step, on the same model and batch, interleaved.

    python benchmarks/train_step.py                          # llama_50m, batch 8 x 256, 7 steps each
    python benchmarks/train_step.py --shape=study_mini       # the default job's model, 32 x 128
    python benchmarks/train_step.py --shape=gemma3_270m      # Gemma 3 270M shape (262k vocab), 2 x 256
    python benchmarks/train_step.py --shape=llama_50m --steps=11 --loss-chunk=128
    python benchmarks/train_step.py --preset=llama_125m --batch=4 --length=256   # any model preset
    python benchmarks/train_step.py --skip-torch             # ours alone
    python benchmarks/train_step.py --torch-threads=1        # PyTorch on one intra-op thread
    python benchmarks/train_step.py --shape=study_mini --also-unrolled   # and ours with unrolled layers
    python benchmarks/train_step.py --shape=study_mini --remat=dots      # another remat policy
    python benchmarks/train_step.py --shape=study_mini --also-remat=none --also-remat=dots

Both steps are built first, then warmed up (two steps each: compilation and
the allocator's first pass), then timed interleaved in this process, one
step of ours, one of PyTorch's, ..., `--steps` times each, so that load from
other work on the machine falls on both alike. Each step is timed to its
completion (JAX: until the new state and metrics are ready).

- ours: `ts.jit_step(sft.make_sft_step(...))`: the jitted, donated SFT step
  (chunked, rematerialised loss), AdamW (lr 1e-4 constant, betas 0.9/0.95,
  weight decay 0.01 on matrices, global-norm clipping at 1.0), one device.
- PyTorch: transformers' LlamaForCausalLM (Gemma3ForCausalLM for Gemma 3
  shapes) built from the same config via `hf_config_dict`, in train mode,
  `model(input_ids, labels).loss`, backward, `clip_grad_norm_(1.0)`,
  `torch.optim.AdamW` (same lr, betas, weight decay 0.01), `zero_grad`.

Reported: the median step time of each, tokens/s, the ratio, model FLOPs
utilisation (PaLM's count) against the float32 matmul peak measured before
and after the timed steps (the better reading), and the load average before
and after. Absolute figures move with the machine's load; read the ratio.
On a loaded machine (load average above the core count) PyTorch's OpenMP
thread team can stall at its barriers on every small op: its step time then
jumps by an order of magnitude on small models, and the ratio reflects the
load, not the steps; compare with --torch-threads=1 before reading it.
Also per step: minor page faults (memory the kernel hands over afresh) and
kernel CPU time. Like the launchers, the benchmark runs with glibc's
huge-page malloc and, under a CPU quota, on as many cores as the quota has
(`rl_reason.process_setup`); `RL_REASON_HUGE_PAGE_MALLOC=0` and
`RL_REASON_FIT_CPUS_TO_QUOTA=0` measure both steps without them.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from benchlib import load_average, matmul_peak_flops, train_flops_per_token  # sets the path first

from rl_reason import process_setup

process_setup.use_huge_page_malloc()  # as the launchers run (restarts this process once)
process_setup.fit_cpus_to_quota()

from rl_reason.algorithms import optimizer, sft
from rl_reason.algorithms import train_state as ts
from rl_reason.experiments.config import base_config
from rl_reason.models.config import PRESETS, REMAT_POLICIES, ModelConfig
from rl_reason.models.hf_config import hf_config_dict, model_family
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd


def study_mini() -> ModelConfig:
    """The default job's model (configs/sft_synthetic.py), with its task's 384-token vocabulary."""
    from configs import sft_synthetic

    return ModelConfig.from_dict({**sft_synthetic.get_config().model.to_dict(), "vocab_size": 384})


# name -> (model config, batch, length): the shapes the training-step issue names.
SHAPES: dict[str, tuple[Callable[[], ModelConfig], int, int]] = {
    "llama_50m": (PRESETS["llama_50m"], 8, 256),
    "study_mini": (study_mini, 32, 128),
    "gemma3_270m": (PRESETS["gemma3_270m"], 2, 256),
}

Step = Callable[[], None]  # runs one training step to completion


def make_batch(config: ModelConfig, batch: int, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32)
    ones = np.ones_like(tokens, bool)
    return {"tokens": tokens, "input_mask": ones, "loss_mask": ones}


def one_device_mesh():
    return mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def jax_adamw():
    """Our optimizer as the PyTorch steps' AdamW: lr 1e-4 constant, betas 0.9/0.95,
    weight decay 0.01, clipping at 1.0."""
    optim = base_config().optim
    optim.update(lr=1e-4, schedule="constant", warmup_steps=0)
    return optimizer.make_optimizer(optim, 1000)[0]


def torch_adamw(params):
    import torch

    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)


def torch_model(config: ModelConfig, length: int):
    """transformers' model of `config`'s family, in train mode, seeded."""
    import torch
    import transformers

    torch.manual_seed(0)
    family = model_family(config)
    hf = hf_config_dict(config, {"max_position_embeddings": max(length, 2048)})
    if family == "gemma3":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**hf))
    elif family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    else:
        raise ValueError(f"No PyTorch step for the {family} family here.")
    model.train()
    return model


def jax_step(config: ModelConfig, chunk: int) -> tuple[Any, Callable, Any]:
    """(train state, jitted SFT step, mesh) on one device, with `jax_adamw`."""
    mesh = one_device_mesh()
    model = Transformer(config)
    tx = jax_adamw()
    state = ts.create_train_state(model, tx, mesh, shd.DEFAULT_RULES, seed=0)
    step = ts.jit_step(
        sft.make_sft_step(model, tx, chunk_size=chunk),
        mesh,
        shd.DEFAULT_RULES,
        ts.state_shardings(model, tx, mesh, shd.DEFAULT_RULES),
    )
    return state, step, mesh


def build_jax(config: ModelConfig, batch: int, length: int, chunk: int) -> Step:
    """Our jitted SFT step on one device; the returned callable advances its own state."""
    state, step, mesh = jax_step(config, chunk)
    data = shd.shard_batch(make_batch(config, batch, length), mesh)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready((holder["state"], metrics))

    return one_step


def build_torch(config: ModelConfig, batch: int, length: int) -> Step:
    """transformers' model of `config`'s family with torch.optim.AdamW."""
    import torch

    model = torch_model(config, length)
    opt = torch_adamw(model.parameters())
    tokens = torch.from_numpy(make_batch(config, batch, length)["tokens"]).long()

    def one_step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one_step


class Timing(NamedTuple):
    seconds: float  # wall time of the step, to its completion
    faults: int  # minor page faults in it: memory the kernel handed over afresh
    kernel_seconds: float  # CPU time spent in the kernel (page faults, thread wake-ups)


def timed(step: Step) -> Timing:
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return Timing(seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama_50m", choices=sorted(SHAPES))
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="a model preset instead of --shape's",
    )
    parser.add_argument("--batch", type=int, default=None, help="default: the shape's")
    parser.add_argument("--length", type=int, default=None, help="default: the shape's")
    parser.add_argument("--steps", type=int, default=7, help="timed steps of each system")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps of each first (>= 1; the first is"
        " reported as the first call: compilation and allocation)",
    )
    parser.add_argument("--loss-chunk", type=int, default=256)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument(
        "--also-unrolled", action="store_true", help="also ours with model.scan_layers=False"
    )
    parser.add_argument(
        "--also-remat",
        action="append",
        default=[],
        choices=REMAT_POLICIES,
        help="also ours with this remat policy (repeatable)",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)"
    )
    parser.add_argument(
        "--remat", default=None, choices=REMAT_POLICIES, help="default: the shape's model config"
    )
    args = parser.parse_args()

    make_config, batch, length = SHAPES[args.shape]
    if args.preset:
        make_config = PRESETS[args.preset]
    config = make_config()
    if args.remat:
        config = config.replace(remat=args.remat)
    batch, length = args.batch or batch, args.length or length
    name = args.preset or args.shape

    loads = [load_average()]
    ours = "rl_reason sft_step (JAX)"
    systems = {ours: build_jax(config, batch, length, args.loss_chunk)}
    if args.also_unrolled:
        unrolled = config.replace(scan_layers=False)
        systems[ours + ", unrolled layers"] = build_jax(unrolled, batch, length, args.loss_chunk)
    for remat in args.also_remat:
        other = config.replace(remat=remat)
        systems[ours + f", remat {remat}"] = build_jax(other, batch, length, args.loss_chunk)
    if not args.skip_torch:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        torch_name = "PyTorch " + (
            "Gemma3ForCausalLM" if model_family(config) == "gemma3" else "LlamaForCausalLM"
        )
        theirs = torch_name + " + AdamW"
        systems[theirs] = build_torch(config, batch, length)
    first = {}  # the first call: compilation (ours) and the allocator's first pass
    for k, step in systems.items():
        first[k] = timed(step).seconds
        for _ in range(args.warmup - 1):
            step()

    peaks = [matmul_peak_flops()]
    times: dict[str, list[Timing]] = {k: [] for k in systems}
    for _ in range(args.steps):
        for k, step in systems.items():
            times[k].append(timed(step))
    peaks.append(matmul_peak_flops())
    loads.append(load_average())

    peak = max(peaks)
    tokens = batch * length
    flops = train_flops_per_token(config, length)
    threads = "" if args.skip_torch else f"; torch threads {torch.get_num_threads()}"
    print(
        f"model {name}: {config.num_params() / 1e6:.1f}M params, vocab {config.vocab_size},"
        f" remat {config.remat},"
        f" batch {batch} x {length} tokens, loss chunk {args.loss_chunk}; {args.steps} timed steps"
        f" each, interleaved, after {args.warmup} warm-up steps{threads}"
    )
    print(
        f"f32 matmul peak {', '.join(f'{p / 1e9:.0f}' for p in peaks)} GFLOP/s (before, after;"
        f" MFU uses {peak / 1e9:.0f}); load average {loads[0]:.2f} before, {loads[1]:.2f} after;"
        f" {flops / 1e6:.0f} MFLOP per token"
    )
    print(
        "| step | first call (s) | median step (s) | min / max (s) | tokens/s | MFU |"
        " page faults / step | kernel CPU s / step |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    medians = {}
    for k, timings in times.items():
        seconds = [t.seconds for t in timings]
        medians[k] = m = statistics.median(seconds)
        faults = statistics.median(t.faults for t in timings)
        kernel = statistics.median(t.kernel_seconds for t in timings)
        print(
            f"| {k} | {first[k]:.2f} | {m:.3f} | {min(seconds):.3f} / {max(seconds):.3f} |"
            f" {tokens / m:.0f} | {100 * tokens * flops / m / peak:.1f}% | {faults:,.0f} |"
            f" {kernel:.3f} |"
        )
    for k in medians:
        if k.startswith(ours) and k != ours:
            print(f"{k}: {medians[ours] / medians[k]:.2f}x the scanned step's speed")
    for k in medians:
        if k.startswith(ours) and not args.skip_torch:
            ratio = medians[theirs] / medians[k]
            print(f"{k}: speed-up over PyTorch (median step time ratio) {ratio:.2f}x")


if __name__ == "__main__":
    main()

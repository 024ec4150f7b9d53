"""The matmuls of one decode step, alone: what XLA:CPU's libraries and PyTorch reach.

    python benchmarks/decode_dots.py                      # llama_125m, 8/32/64 rows
    python benchmarks/decode_dots.py --preset gemma3_270m --rows 80

A decode step multiplies [rows, in] activations by every layer's weights, which
are read from memory each step (hundreds of MB, far beyond the caches). This
times exactly those products, each layer with its own weights, chained so that
nothing overlaps, in three XLA:CPU settings (its default YNNPACK fusions, plain
dots through XNNPACK, Eigen) and in PyTorch, and adds them up to the time a
step's matmuls take. That sum bounds a sampler's decode rate from above for
that library before attention, sampling or any other work: rows / (matmul
time) tokens/s.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from benchlib import matmul_peak_flops  # benchmarks/ is on the path when run as a script

from rl_reason.models import config as config_lib
from rl_reason.sampling.sampler import CPU_XNNPACK_DOTS

LIBRARIES = {
    "xla ynnpack (default)": None,
    "xla xnnpack dots": CPU_XNNPACK_DOTS,
    "xla eigen": {**CPU_XNNPACK_DOTS, "xla_cpu_use_xnnpack": False},
}


def step_shapes(config: config_lib.ModelConfig) -> dict[str, tuple[int, int, int]]:
    """(in, out, count) of every weight a decode step multiplies by."""
    c, layers = config, config.num_layers
    return {
        "q": (c.hidden_dim, c.num_heads * c.head_dim, layers),
        "k, v": (c.hidden_dim, c.num_kv_heads * c.head_dim, 2 * layers),
        "o": (c.num_heads * c.head_dim, c.hidden_dim, layers),
        "gate, up": (c.hidden_dim, c.mlp_dim, 2 * layers),
        "down": (c.mlp_dim, c.hidden_dim, layers),
        "unembed": (c.hidden_dim, c.vocab_size, 1),
    }


def best_seconds(call, repeats: int) -> float:
    call()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def time_xla(rows, fan_in, fan_out, count, options, repeats) -> float:
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.random((fan_in, fan_out), np.float32)) for _ in range(count)]
    x = jnp.asarray(rng.random((rows, fan_in), np.float32))

    def chain(x, weights):
        for w in weights:  # each product waits for the previous one, as layers do
            x = x + (x @ w)[:, :1] * 1e-3
        return x

    f = jax.jit(chain, compiler_options=options)
    return best_seconds(lambda: f(x, weights).block_until_ready(), repeats)


def time_torch(rows, fan_in, fan_out, count, repeats) -> float:
    weights = [torch.rand(fan_in, fan_out) for _ in range(count)]
    x0 = torch.rand(rows, fan_in)

    def chain():
        x = x0
        for w in weights:
            x = x + (x @ w)[:, :1] * 1e-3
        return x

    with torch.no_grad():
        return best_seconds(chain, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama_125m")
    parser.add_argument("--rows", default="8,32,64")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = getattr(config_lib, args.preset)()
    shapes = step_shapes(config)
    peak = matmul_peak_flops()
    print(
        f"{args.preset}: f32 matmul peak {peak / 1e9:.0f} GFLOP/s (2048^3); torch threads"
        f" {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}"
    )
    systems = [*LIBRARIES, "torch"]
    print(
        f"\n| rows | weights | {' | '.join(f'{s} GFLOP/s' for s in systems)} |"
        f"\n|{'---|' * (len(systems) + 2)}"
    )
    totals = {}
    for rows in (int(r) for r in args.rows.split(",")):
        step = dict.fromkeys(systems, 0.0)
        for name, (fan_in, fan_out, count) in shapes.items():
            seconds = {
                library: time_xla(rows, fan_in, fan_out, count, options, args.repeats)
                for library, options in LIBRARIES.items()
            }
            seconds["torch"] = time_torch(rows, fan_in, fan_out, count, args.repeats)
            flops = 2 * rows * fan_in * fan_out * count
            cells = " | ".join(f"{flops / seconds[s] / 1e9:.1f}" for s in systems)
            print(f"| {rows} | {name} ({count}x {fan_in}x{fan_out}) | {cells} |", flush=True)
            for s in systems:
                step[s] += seconds[s]
        totals[rows] = step
    print(
        "\nWhole step's matmuls (ms) and the decode rate they alone allow (tokens/s):\n"
        f"\n| rows | {' | '.join(systems)} |\n|{'---|' * (len(systems) + 1)}"
    )
    for rows, step in totals.items():
        cells = " | ".join(f"{1e3 * step[s]:.1f} ms = {rows / step[s]:.0f}" for s in systems)
        print(f"| {rows} | {cells} |")


if __name__ == "__main__":
    main()

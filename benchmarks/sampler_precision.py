"""A bfloat16 sampler against the float32 one: tokens/s, weights and KV-cache bytes.

    python benchmarks/sampler_precision.py                    # 125M Llama, batch 8/32, 128 new tokens
    python benchmarks/sampler_precision.py --batches 8,32,64 --repeats 5
    python benchmarks/sampler_precision.py --quick            # 2 layers, 16 tokens

`benchmarks/sampling.py`'s setting (125M Llama, random weights, 64-token
prompts, every row runs the whole budget, greedy, tokens/s of one whole call
prompt ids in and token ids out, after an untimed compiling call), with two
samplers of the same weights: `float32` (today's) and `bfloat16` (a cast copy
of the weights, a bfloat16 KV cache; what `Sampler(dtype="bfloat16")` runs).
The calls of the two are interleaved and each cell is the median of
--repeats. Beside them: the float32 and bfloat16 matmul peaks (2048^3) and a
decode-shaped product ([batch, 768] x [768, 2048]) in each dtype, measured in
the same run, so that whether XLA:CPU runs bfloat16 on faster units shows in
the figures, and the load average, since the machine is shared.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import PAD, init_params, load_average, make_prompts, matmul_peak_flops

from rl_reason.models import precision
from rl_reason.models.config import llama_125m
from rl_reason.models.transformer import Transformer
from rl_reason.sampling.sampler import SamplingConfig, sample_jit

DTYPES = ("float32", "bfloat16")


def product_flops(dtype, rows: int, repeats: int = 50) -> float:
    """FLOP/s of [rows, 768] x [768, 2048], the 125M model's MLP product at decode."""
    x = jnp.ones((rows, 768), dtype)
    w = jnp.ones((768, 2048), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(x, w).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(x, w).block_until_ready()
    return 2 * rows * 768 * 2048 * repeats / (time.perf_counter() - start)


def bf16_dot_runs_in_f32() -> bool:
    """Whether XLA compiles a bfloat16 x bfloat16 product as converts to float32 around a
    float32 dot (XLA:CPU does: it has no bfloat16 dot kernel, whatever the CPU's units)."""
    x = jnp.ones((32, 768), jnp.bfloat16)
    w = jnp.ones((768, 2048), jnp.bfloat16)
    hlo = jax.jit(lambda a, b: a @ b).lower(x, w).compile().as_text()
    upcast = re.search(r"= f32\[[0-9,]+\]\S* convert\(", hlo)  # bf16 operand -> f32
    return upcast is not None and re.search(r"bf16\[[0-9,]+\]\S* dot\(", hlo) is None


def machine(batches) -> str:
    parts = [f"load {load_average():.1f}"]
    for dtype in DTYPES:
        parts.append(f"{dtype} matmul peak {matmul_peak_flops(jnp.dtype(dtype)) / 1e9:.0f} GFLOP/s")
    for b in batches:
        figures = [f"{product_flops(jnp.dtype(d), b) / 1e9:.0f}" for d in DTYPES]
        parts.append(f"[{b},768]x[768,2048] f32/bf16 {figures[0]}/{figures[1]} GFLOP/s")
    return "; ".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    config = llama_125m()
    if args.quick:
        config = config.replace(num_layers=2)
        batches, args.new_tokens, args.repeats = [2], 16, 1
    print(
        f"{jax.default_backend()}: a bfloat16 dot compiles to a float32 dot between converts:"
        f" {bf16_dot_runs_in_f32()}",
        flush=True,
    )
    print("before:", machine(batches), flush=True)
    params = init_params(config, 0)
    samplers = {}
    for dtype in DTYPES:
        sampler_config = precision.sampler_config(config, None if dtype == "float32" else dtype)
        weights = precision.cast_floating(params, dtype)
        samplers[dtype] = (Transformer(sampler_config), weights)
        max_len = args.prompt_len + args.new_tokens
        print(
            f"  {dtype}: weights {precision.tree_bytes(weights) / 2**20:.0f} MiB, KV cache per"
            f" row of {max_len} slots"
            f" {precision.kv_cache_bytes(sampler_config, 1, max_len) / 2**20:.1f} MiB"
            + "".join(
                f", batch {b}: {precision.kv_cache_bytes(sampler_config, b, max_len) / 2**20:.0f} MiB"
                for b in batches
            ),
            flush=True,
        )
    options = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, pad_id=PAD)
    prompts_all = make_prompts(config, max(batches), args.prompt_len, 0)
    for batch in batches:
        prompts = prompts_all[:batch]
        mask = np.ones(prompts.shape, bool)
        rng = jax.random.PRNGKey(0)

        def call(dtype, prompts=prompts, mask=mask, rng=rng):
            model, weights = samplers[dtype]
            out = sample_jit(model, weights, prompts, mask, rng, options)
            return np.asarray(out.completion_tokens)

        first = {d: call(d) for d in DTYPES}  # compile
        agree = float(np.mean(first["float32"] == first["bfloat16"]))
        times = {d: [] for d in DTYPES}
        loads = []
        for _ in range(args.repeats):
            for d in DTYPES:
                start = time.perf_counter()
                call(d)
                times[d].append(time.perf_counter() - start)
            loads.append(load_average())
        tps = {d: batch * args.new_tokens / statistics.median(times[d]) for d in DTYPES}
        print(
            f"  batch {batch}: float32 {tps['float32']:.1f} tok/s, bfloat16"
            f" {tps['bfloat16']:.1f} tok/s (bf16/f32 {tps['bfloat16'] / tps['float32']:.2f}x);"
            f" greedy tokens equal {agree:.0%}; load {min(loads):.1f}-{max(loads):.1f}",
            flush=True,
        )
    print("after:", machine(batches), flush=True)


if __name__ == "__main__":
    main()

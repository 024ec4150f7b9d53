"""One decode step (model + token choice) of a preset, timed and profiled op by op.

    python benchmarks/decode_step.py --preset llama_125m --batch 32 --cache 192
    python benchmarks/decode_step.py --preset gemma3_270m --batch 80 --cache 1216
    python benchmarks/decode_step.py --preset gemma3_270m --batch 80 --cache 448 --shared 768

Random weights (the cost does not depend on them). Prints seconds per step
and the ops that took the most time in a `jax.profiler` trace of a few steps,
with their output shapes, to find where a decode step goes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from rl_reason.models import config as config_lib
from rl_reason.models.transformer import KVCache, Transformer
from rl_reason.sampling.sampler import SamplingConfig, choose_tokens


def build_step(model: Transformer, sampling: SamplingConfig, batch: int):
    keys = jax.random.split(jax.random.PRNGKey(0), batch)

    def step(params, tokens, positions, cache, shared):
        out = model.apply(params, tokens[:, None], positions[:, None], cache=cache, shared=shared)
        logits = model.apply(params, out.hidden[:, -1], method=Transformer.logits)
        return choose_tokens(logits, keys, sampling)[0], out.cache

    return jax.jit(step, donate_argnums=(3,))


def top_ops(trace_dir: str, hlo_text: str, steps: int, count: int) -> list[str]:
    shapes = dict(re.findall(r"%(\S+) = (\S+\[[^\]]*\])", hlo_text))
    trace = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    total, calls = collections.Counter(), collections.Counter()
    for event in json.load(gzip.open(trace))["traceEvents"]:
        op = event.get("args", {}).get("hlo_op") if event.get("ph") == "X" else None
        if op:
            name = re.sub(r"[.]\d+$", "", op)
            key = f"{name} {shapes.get(op, '?')}"
            total[key] += event["dur"] / steps
            calls[key] += 1
    return [
        f"{us / 1e3:9.1f} ms/step {calls[key] // steps:4d} calls  {key}"
        for key, us in total.most_common(count)
    ]


def filled_cache(config, batch: int, slots: int, first_position: int, filled: int) -> KVCache:
    """A cache whose first `filled` slots hold positions first_position, first_position + 1, ..."""
    slot = jnp.arange(slots)
    positions = jnp.where(slot < filled, first_position + slot, -1).astype(jnp.int32)
    return KVCache.init(config, batch, slots).replace(
        index=jnp.asarray(filled, jnp.int32), positions=positions[None].repeat(batch, 0)
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama_125m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cache", type=int, default=192, help="cache slots per row")
    parser.add_argument(
        "--shared", type=int, default=0, help="slots of a prompt prefix all rows share"
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    config = getattr(config_lib, args.preset)().replace(scan_layers=False)
    model = Transformer(config)
    tokens = jnp.zeros((args.batch,), jnp.int32)
    params = jax.jit(
        lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens[:1, None], tokens[:1, None]))
    )()
    filled = args.cache - 1
    shared = None
    if args.shared:
        shared = filled_cache(config, 1, args.shared, 0, args.shared)
    cache = filled_cache(config, args.batch, args.cache, args.shared, filled)
    positions = jnp.full((args.batch,), args.shared + filled, jnp.int32)
    step = build_step(model, SamplingConfig(temperature=args.temperature), args.batch)
    hlo = step.lower(params, tokens, positions, cache, shared).compile().as_text()
    tokens, cache = step(params, tokens, positions, cache, shared)
    jax.block_until_ready(tokens)

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for _ in range(args.steps):
            tokens, cache = step(params, tokens % 100, positions, cache, shared)
        jax.block_until_ready(tokens)
        seconds = (time.perf_counter() - start) / args.steps
        jax.profiler.stop_trace()
        ops = top_ops(trace_dir, hlo, args.steps, args.top)
    print(
        f"{args.preset}, batch {args.batch}, {args.cache} cache slots + {args.shared} shared:"
        f" {seconds:.3f} s/step,"
        f" {args.batch / seconds:.0f} tokens/s (profiled)"
    )
    print("\n".join(ops))


if __name__ == "__main__":
    main()

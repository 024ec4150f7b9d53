"""One `sample()` call of a preset: prefill and per-step decode time, and where a step goes.

    python benchmarks/sample_call.py --preset llama_125m --prompts 32 --prompt-len 64 --new 128
    python benchmarks/sample_call.py --preset study_mini --prompts 32 --samples 4 --prompt-len 128 \\
        --new 48 --temperature 1 --profile          # the default job's EI/ORM sampling call
    python benchmarks/sample_call.py --preset gemma3_270m --prompts 16 --samples 5 \\
        --prefix 768 --prompt-len 128 --new 32 --temperature 0.7 --profile

Random weights (the cost does not depend on them); every row decodes all
`--new` tokens. The program timed is the sampler's own (prefill, then the
`lax.while_loop`), so what XLA does to the cache inside the loop is what is
measured. "Prefill + first token" is a call with one new token; a decode
step is the rest of a full call divided by the remaining steps. `--profile` lists
the ops that took the most time per decode step in a `jax.profiler` trace,
with their output shapes (ops of the prefill are listed once per call).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from benchlib import load_average, matmul_peak_flops  # benchmarks/ is on the path; sets ours first

from rl_reason.models import config as config_lib
from rl_reason.models.transformer import Transformer
from rl_reason.sampling.sampler import SamplingConfig, prefill_prefix_jit, sample_jit


def top_ops(trace_dir: str, hlo_text: str, steps: int, count: int) -> list[str]:
    shapes = dict(re.findall(r"%(\S+) = (\S+\[[^\]]*\])", hlo_text))
    trace = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    total, calls = collections.Counter(), collections.Counter()
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    for event in events:
        op = event.get("args", {}).get("hlo_op") if event.get("ph") == "X" else None
        if op:
            name = re.sub(r"[.]\d+$", "", op)
            key = f"{name} {shapes.get(op, '?')}"
            total[key] += event["dur"] / steps
            calls[key] += 1
    return [
        f"{us / 1e3:9.1f} ms/step {calls[key] / steps:6.1f} calls  {key}"
        for key, us in total.most_common(count)
    ]


def preset_config(name: str) -> config_lib.ModelConfig:
    """A preset of models/config.py, or "study_mini": the default job's 0.8M model."""
    if name == "study_mini":
        from configs import sft_synthetic

        model = sft_synthetic.get_config().model.to_dict()
        return config_lib.ModelConfig.from_dict({**model, "vocab_size": 384})
    return config_lib.PRESETS[name]()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama_125m", help="a model preset or study_mini")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1, help="K per prompt")
    parser.add_argument("--prefix", type=int, default=0, help="prompt tokens all rows share")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt after it")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args()

    config = preset_config(args.preset).replace(scan_layers=False)
    model = Transformer(config)
    one = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), one, one)))()
    token_ids = lambda n, stride: (jnp.arange(n) * stride) % min(1000, config.vocab_size - 5) + 5
    prefix = None
    if args.prefix:
        prefix = prefill_prefix_jit(model, params, token_ids(args.prefix, 3).astype(jnp.int32))
    tokens = token_ids(args.prompts * args.prompt_len, 7).reshape(args.prompts, -1)
    mask = jnp.ones(tokens.shape, bool)
    # No EOS: every row decodes the whole budget (and the batch never shrinks).
    sampling = SamplingConfig(
        min_rows=0,
        max_new_tokens=args.new,
        temperature=args.temperature,
        num_samples=args.samples,
        greedy_first=args.samples > 1 and args.temperature > 0,
    )
    rng = jax.random.PRNGKey(1)
    call = lambda config: sample_jit(model, params, tokens, mask, rng, config, 0, prefix)

    def seconds(config) -> float:
        jax.block_until_ready(call(config))  # compile
        start = time.perf_counter()
        jax.block_until_ready(call(config))
        return time.perf_counter() - start

    load, peak = load_average(), matmul_peak_flops()
    first = seconds(dataclasses.replace(sampling, max_new_tokens=1))
    full = seconds(sampling)
    rows = args.prompts * args.samples
    step = (full - first) / max(args.new - 1, 1)
    print(
        f"{args.preset}: {rows} rows, {args.prefix} shared + {args.prompt_len} prompt tokens,"
        f" {args.new} new: call {full:.2f} s, prefill + first token {first:.2f} s,"
        f" decode {step * 1e3:.1f} ms/step = {rows / step:.1f} tokens/s"
        f" (f32 matmul peak {peak / 1e9:.0f} GFLOP/s; load average {load:.2f} -> {load_average():.2f})"
    )
    if args.profile:
        hlo = sample_jit.lower(model, params, tokens, mask, rng, sampling, 0, prefix)
        hlo = hlo.compile().as_text()
        with tempfile.TemporaryDirectory() as trace_dir:
            jax.profiler.start_trace(trace_dir)
            jax.block_until_ready(call(sampling))
            jax.profiler.stop_trace()
            print("\n".join(top_ops(trace_dir, hlo, args.new, args.top)))


if __name__ == "__main__":
    main()

"""Mixed-length rollouts: the continuous-batching engine against today's static sampler.

    python benchmarks/rollout_engine.py                # 125M Llama, 8 prompts x K=16, up to 200 tokens
    python benchmarks/rollout_engine.py --quick        # smoke run: 2 layers, short
    python benchmarks/rollout_engine.py --prompts 16 --rows 64

The workload of an RL rollout or a maj@K evaluation: --prompts prompts of
40-120 tokens (random ids), K samples each at temperature 1, and completions
that stop at an "answer end": a set of token ids (the EOS ids) whose chance
under the random model ends a completion after a roughly geometric number of
tokens (mean about --mean-length), capped at --max-new. Both systems sample
the same rows with the same keys (the fraction of identical rows is printed):

- static: `sample_jit` over batches of rows/K prompts x K rows, prompts
  left-padded to the batch's longest, the decode batch shrinking as rows
  finish (min_rows 8), as `Sampler.generate` runs it;
- engine: `continuous.Engine` with `rows` decode slots and 16-token pages.

Each cell is the best of --repeats calls after a warm-up call (compilation),
the systems interleaved.

--bound also prints what any continuous batcher could gain here at most:
the static sampler's decode step is timed at each batch size its schedule
runs (the first phase over the K rows' grouped prompt cache, the later ones
over copies) and at `rows`, and the static run's own completion lengths
give (a) the static schedule's decode time under those step costs and
(b) an ideal engine's: every step full, tokens / rows steps at the cost of a
full static step, no prefill, no host, no tail. (a) / (b) is the most any
slot-refilling engine with this machine's step gains over the static
sampler on this workload; the less a step's cost falls with its rows, the
more it is. KV bytes: the dense cache the static sampler holds
(rows x (prompt + max_new) slots, every layer's keys and values) against the
engine's peak pages in use, each divided by the tokens generated while it
was held (per batch for the static sampler; the whole call for the engine).
"""

from __future__ import annotations

import argparse
import time
import types

import jax
import numpy as np
from benchlib import init_params, load_average, matmul_peak_flops

from rl_reason.models.config import llama_125m
from rl_reason.models.transformer import Transformer
from rl_reason.sampling.continuous import Engine, EngineConfig
from rl_reason.sampling.sampler import (
    SamplingConfig,
    _decode_batch_sizes,
    left_pad,
    sample_jit,
)


def workload(config, prompts: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(40, 121, prompts)
    return [rng.integers(1, config.vocab_size, n).tolist() for n in lengths]


class Static:
    """Today's sampler as the engine's Sampler calls it: fixed batches of prompts x K."""

    def __init__(self, config, params, rows: int, k: int):
        self.model = Transformer(config.replace(scan_layers=False))
        self.params = params
        self.prompts_per_call = max(1, rows // k)

    def run(self, ids, rng, options):
        parts, kv_bytes = [], []
        c = self.model.config
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
        for start in range(0, len(ids), self.prompts_per_call):
            batch = ids[start : start + self.prompts_per_call]
            width = max(map(len, batch))
            tokens, mask = left_pad(batch, width)
            out = sample_jit(self.model, self.params, tokens, mask, rng, options, np.int32(start))
            out = jax.tree.map(np.asarray, out)
            rows = len(batch) * options.num_samples
            held = rows * (width + options.max_new_tokens) * per_token
            kv_bytes.append(held / max(1, out.lengths.sum()))
            parts.append(out)
        joined = {
            name: np.concatenate([getattr(p, name) for p in parts])
            for name in ("completion_tokens", "lengths")
        }
        return types.SimpleNamespace(**joined), float(np.mean(kv_bytes))


def step_seconds(model, params, prompts: int, k: int, new: int = 64) -> float:
    """One decode step of the static sampler at prompts x k rows over 80-token prompts
    (the workload's mean; no EOS; k > 1 reads the prompts' grouped cache): a call of
    `new` tokens less a call of one, per step."""
    tokens = jax.random.randint(jax.random.PRNGKey(7), (prompts, 80), 1, 1000)
    mask = np.ones(tokens.shape, bool)

    def seconds(max_new):
        config = SamplingConfig(max_new_tokens=max_new, temperature=1.0, num_samples=k)
        call = lambda: sample_jit(model, params, tokens, mask, jax.random.PRNGKey(0), config, 0)
        jax.block_until_ready(call())  # compile
        start = time.perf_counter()
        jax.block_until_ready(call())
        return time.perf_counter() - start

    return (seconds(new) - seconds(1)) / (new - 1)


def decode_bound(static: Static, lengths: np.ndarray, rows: int, k: int, min_rows: int):
    """(the static schedule's decode seconds, an ideal engine's, the step costs by size)
    for these completion lengths, in the static run's row order (batches of `rows`)."""
    model, params = static.model, static.params
    sizes = _decode_batch_sizes(rows, min_rows)
    first = step_seconds(model, params, rows // k, k)  # the K rows over their prompt's cache
    cost = {size: step_seconds(model, params, size, 1) for size in sizes}  # rows with copies
    scheduled = 0.0
    for start in range(0, len(lengths), rows):
        batch = lengths[start : start + rows]
        for t in range(1, int(batch.max()) + 1):
            size = min(s for s in sizes if s >= (batch >= t).sum())
            scheduled += first if size == rows else cost[size]
    return scheduled, lengths.sum() / rows * cost[rows], {"grouped": first, **cost}


class Paged:
    def __init__(self, config, params, rows: int):
        self.engine = Engine(config, EngineConfig(slots=rows, page_size=16))
        self.params = params

    def run(self, ids, rng, options):
        out = self.engine.generate(self.params, ids, rng, options)
        held = self.engine.stats["peak_pages"] * self.engine.config.page_bytes(
            self.engine.model.config
        )
        return out, held / max(1, out.lengths.sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16, help="K per prompt")
    parser.add_argument("--rows", type=int, default=32, help="rows decoded at once (both systems)")
    parser.add_argument("--max-new", type=int, default=200)
    parser.add_argument("--mean-length", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bound", action="store_true", help="the most an engine could gain")
    args = parser.parse_args()
    config = llama_125m()
    if args.quick:
        config = config.replace(num_layers=2)
        args.prompts, args.samples, args.rows, args.max_new, args.mean_length = 4, 4, 8, 32, 12
    load_before, peak_before = load_average(), matmul_peak_flops()
    params = init_params(config, args.seed)
    answer_end = tuple(range(1000, 1000 + config.vocab_size // args.mean_length))
    options = SamplingConfig(
        max_new_tokens=args.max_new, temperature=1.0, num_samples=args.samples, eos_ids=answer_end
    )
    ids = workload(config, args.prompts, args.seed)
    systems = {
        "static": Static(config, params, args.rows, args.samples),
        "engine": Paged(config, params, args.rows),
    }
    rng = jax.random.PRNGKey(args.seed)
    print(
        f"llama_125m{' (2 layers, --quick)' if args.quick else ''}: {args.prompts} prompts"
        f" x K={args.samples}, {args.rows} rows at once, up to {args.max_new} new tokens;"
        f" load average {load_before:.1f}",
        flush=True,
    )
    outputs = {name: system.run(ids, rng, options) for name, system in systems.items()}  # warm-up
    best = dict.fromkeys(systems, float("inf"))
    for _ in range(args.repeats):
        for name, system in systems.items():
            start = time.perf_counter()
            outputs[name] = system.run(ids, rng, options)
            best[name] = min(best[name], time.perf_counter() - start)
    (static, static_kv), (engine, engine_kv) = outputs["static"], outputs["engine"]
    same = np.mean(np.all(static.completion_tokens == engine.completion_tokens, axis=1))
    tokens = int(engine.lengths.sum())
    lengths = engine.lengths
    print(
        f"completion lengths: mean {lengths.mean():.0f}, min {lengths.min()}, max {lengths.max()};"
        f" {tokens} tokens; identical rows {100 * same:.1f}%"
    )
    print(
        "\n| system | wall s | tok/s | vs static | KV bytes / generated token |\n|---|---|---|---|---|"
    )
    for name, kv in (("static", static_kv), ("engine", engine_kv)):
        print(
            f"| {name} | {best[name]:.2f} | {tokens / best[name]:.1f} |"
            f" {best['static'] / best[name]:.2f}x | {kv:,.0f} |"
        )
    stats = systems["engine"].engine.stats
    print(f"\nengine: {stats}")
    if args.bound:
        scheduled, ideal, cost = decode_bound(
            systems["static"], static.lengths, args.rows, args.samples, options.min_rows
        )
        steps = ", ".join(f"{name}: {1e3 * c:.1f} ms" for name, c in cost.items())
        print(
            f"\nbound: decode step by rows ({steps}); the static schedule's decode"
            f" {scheduled:.2f} s"
            f" (of its {best['static']:.2f} s), an ideal engine's {ideal:.2f} s:"
            f" at most {scheduled / ideal:.2f}x (the engine measured"
            f" {best['static'] / best['engine']:.2f}x)"
        )
    print(
        f"f32 matmul peak {peak_before / 1e9:.0f} GFLOP/s before, {matmul_peak_flops() / 1e9:.0f}"
        f" after; load average {load_before:.1f} before, {load_average():.1f} after"
    )


if __name__ == "__main__":
    main()

"""A decode step's two attention products over the KV cache, in the order the sampler
writes them and with the cache as the product's leading operand.

    python benchmarks/decode_attention_dots.py                  # llama_125m's heads
    python benchmarks/decode_attention_dots.py --rows 64 --lengths 192,384,768

At one query a row, attention reads the whole cache once per layer: q.K over the
keys and p.V over the values, with only G (query heads per KV head) columns on
the other side. `attention._segment_forward` writes them as "bkgtd,bksd->bkgts"
and "bkgts,bkds->bkgtd" (the query side first). XLA:CPU runs that order well
below the memory's speed; the same products with the cache's dimension leading
the output ("bksd,bkgtd->bksgt", "bkds,bkgts->bkdgt") are the same sums of the
same terms. This times both for one layer, interleaved (medians of 15), beside a
plain sum over K's bytes (what reading them costs), with the run's matmul peak
and load average, and how far the two orders' results differ.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import load_average, matmul_peak_flops, median_ms  # benchmarks/ is on the path

from rl_reason.models import config as config_lib

# name: (q.K, p.V), each a function of (query-side array, cache array).
ORDERS = {
    "query first (today)": (
        lambda q, k: jnp.einsum("bkgtd,bksd->bkgts", q, k),
        lambda p, v: jnp.einsum("bkgts,bkds->bkgtd", p, v),
    ),
    "cache first": (
        lambda q, k: jnp.einsum("bksd,bkgtd->bksgt", k, q),
        lambda p, v: jnp.einsum("bkds,bkgts->bkdgt", v, p),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama_125m")
    parser.add_argument("--rows", default="8,32,64")
    parser.add_argument("--lengths", default="192,384")
    args = parser.parse_args()
    config = config_lib.PRESETS[args.preset]()
    kv, d = config.num_kv_heads, config.head_dim
    g = config.num_heads // kv
    peak = matmul_peak_flops() / 1e9
    load = load_average()
    rng = np.random.default_rng(0)
    print(f"{args.preset}: {kv} KV heads x {g} query heads, head_dim {d}; one query a row")
    print("| rows x keys | MB of K | " + " | ".join(
        f"{part} {name}" for name in ORDERS for part in ("q.K", "p.V")
    ) + " | plain sum of K | largest differences q.K, p.V |")  # fmt: skip
    for rows in map(int, args.rows.split(",")):
        for length in map(int, args.lengths.split(",")):
            q = jnp.asarray(rng.standard_normal((rows, kv, g, 1, d)), jnp.float32)
            k = jnp.asarray(rng.standard_normal((rows, kv, length, d)), jnp.float32)
            v = jnp.asarray(rng.standard_normal((rows, kv, d, length)), jnp.float32)
            p = jax.nn.softmax(ORDERS["query first (today)"][0](q, k), axis=-1)
            calls = {"plain sum": (jax.jit(jnp.sum), (k,))}
            for name, (scores, values) in ORDERS.items():
                calls[f"q.K {name}"] = (jax.jit(scores), (q, k))
                calls[f"p.V {name}"] = (jax.jit(values), (p, v))
            ms = median_ms(calls, repeats=15)  # interleaved
            cells = [f"{ms[f'{part} {name}']:.2f} ms" for name in ORDERS for part in ("q.K", "p.V")]
            (s0, o0), (s1, o1) = [(f(q, k), h(p, v)) for f, h in ORDERS.values()]
            ds = np.abs(s0 - np.moveaxis(s1, 2, -1)).max()
            do = np.abs(o0 - np.moveaxis(o1, 2, -1)).max()
            print(
                f"| {rows} x {length} | {k.nbytes / 1e6:.1f} | {' | '.join(cells)} |"
                f" {ms['plain sum']:.2f} ms | {ds:.1e}, {do:.1e} |"
            )
    after = load_average()
    print(f"(float32 matmul peak {peak:.0f} GFLOP/s; load average {load:.2f} -> {after:.2f})")


if __name__ == "__main__":
    main()

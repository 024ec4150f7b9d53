"""A decode step's two attention products over the KV cache, in the order the sampler
writes them and with the cache as the product's leading operand.

    python benchmarks/decode_attention_dots.py                  # llama_125m's heads
    python benchmarks/decode_attention_dots.py --rows 8,64 --lengths 192,384

At one query a row, attention reads the whole cache once per layer: q.K over the
keys and p.V over the values, with only G (query heads per KV head) columns on
the other side. `attention._segment_forward` writes them as "bkgtd,bksd->bkgts"
and "bkgts,bkds->bkgtd" (the query side first). XLA:CPU runs that order well
below the memory's speed; the same products with the cache's dimension leading
the output ("bksd,bkgtd->bksgt", "bkds,bkgts->bkdgt") are the same sums of the
same terms. This times both, per layer, with the cache bytes each reads, the
run's matmul peak and the read bandwidth of a plain sum over as many bytes.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import load_average, matmul_peak_flops  # benchmarks/ is on the path

from rl_reason.models import config as config_lib

SPECS = {
    "query first (today)": ("bkgtd,bksd->bkgts", "bkgts,bkds->bkgtd"),
    "cache first": ("bksd,bkgtd->bksgt", "bkds,bkgts->bkdgt"),
}


def median_ms(fn, *args, repeats: int = 7, inner: int = 12) -> float:
    fn = jax.jit(fn)
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / inner)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama_125m")
    parser.add_argument("--rows", default="8,32,64")
    parser.add_argument("--lengths", default="192")
    args = parser.parse_args()
    config = getattr(config_lib, args.preset)()
    kv, d = config.num_kv_heads, config.head_dim
    g = config.num_heads // kv
    peak = matmul_peak_flops() / 1e9
    load = load_average()
    rng = np.random.default_rng(0)
    print(f"{args.preset}: {kv} KV heads x {g} query heads, head_dim {d}; one query a row")
    for rows in map(int, args.rows.split(",")):
        for length in map(int, args.lengths.split(",")):
            q = jnp.asarray(rng.standard_normal((rows, kv, g, 1, d)), jnp.float32)
            k = jnp.asarray(rng.standard_normal((rows, kv, length, d)), jnp.float32)
            v = jnp.asarray(rng.standard_normal((rows, kv, d, length)), jnp.float32)
            p = jax.nn.softmax(jnp.einsum(SPECS["query first (today)"][0], q, k), axis=-1)
            mb = k.nbytes / 1e6
            plain = median_ms(jnp.sum, k)
            line = [f"rows {rows:3d} keys {length:4d} ({mb:5.1f} MB each):"]
            outputs = {}
            for name, (qk, pv) in SPECS.items():
                cache_first = name == "cache first"
                scores = lambda q, k, qk=qk, cf=cache_first: (
                    jnp.einsum(qk, k, q) if cf else jnp.einsum(qk, q, k)
                )
                values = lambda p, v, pv=pv, cf=cache_first: (
                    jnp.einsum(pv, v, p) if cf else jnp.einsum(pv, p, v)
                )
                a, b = median_ms(scores, q, k), median_ms(values, p, v)
                outputs[name] = (np.asarray(scores(q, k)), np.asarray(values(p, v)))
                line.append(f"{name}: q.K {a:.2f} ms ({mb / a:.1f} GB/s), p.V {b:.2f} ms;")
            line.append(f"a plain sum {plain:.2f} ms ({mb / plain:.1f} GB/s);")
            (s0, o0), (s1, o1) = outputs.values()
            s1, o1 = np.moveaxis(s1, 2, -1), np.moveaxis(o1, 2, -1)
            line.append(
                f"largest differences q.K {np.abs(s0 - s1).max():.1e}, p.V {np.abs(o0 - o1).max():.1e}"
            )
            print(" ".join(line))
    after = load_average()
    print(f"(float32 matmul peak {peak:.0f} GFLOP/s; load average {load:.2f} -> {after:.2f})")


if __name__ == "__main__":
    main()

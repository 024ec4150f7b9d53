"""One decode step's attention: the dense cache against the paged kernel's block sizes.

    python benchmarks/paged_attention.py                     # 64 rows x 192 keys, 4 KV heads
    python benchmarks/paged_attention.py --rows 32 --keys 320 --kv-heads 12

Per layer, one query per row (decode), float32: `attention.attend` over the
dense cache ([B, K, S, D], "xla"), and `attention.paged_attention` over a
shuffled pool of 16-token pages with blocks of 16..256 tokens. Each figure is
the median over 5 calls of a 20-step `fori_loop` divided by 20 (the page
table depends on the loop's carry so that XLA cannot hoist the gathers out).
"""

from __future__ import annotations

import argparse
import statistics
import time

import benchlib  # noqa: F401  (puts this checkout first on the path)
import jax
import jax.numpy as jnp
import numpy as np
from benchlib import load_average, matmul_peak_flops

from rl_reason.models import attention

STEPS = 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--keys", type=int, default=192)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    b, s, h, kh, d, page = args.rows, args.keys, args.heads, args.kv_heads, args.head_dim, 16
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q = normal(b, 1, h, d)
    k, v = normal(b, kh, s, d), normal(b, kh, d, s)
    kpos = jnp.broadcast_to(jnp.arange(s), (b, s))
    pages = b * s // page + 1
    table = jnp.asarray(rng.permutation(np.arange(1, pages)).reshape(b, s // page), jnp.int32)
    k_pool, v_pool = normal(pages, page, kh, d), normal(pages, page, kh, d)

    def looped(fn):
        def run(q, *arrays):
            def step(_, q):
                dep = (q[0, 0, 0, 0] > 1e30).astype(jnp.int32)  # 0, but not known to XLA
                return fn(q, table + dep, jnp.full((b, 1), s - 1) + dep, *arrays)

            return jax.lax.fori_loop(0, STEPS, step, q)

        return jax.jit(run)

    def timed(fn, *arrays):
        fn(q, *arrays).block_until_ready()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn(q, *arrays).block_until_ready()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times) / STEPS

    load, peak = load_average(), matmul_peak_flops()
    print(f"{b} rows x {s} keys, {h} heads / {kh} KV heads x {d}; load average {load:.1f}")
    dense = looped(
        lambda q, _, qpos, k, v: attention.attend(
            q, [(k, v, kpos)], 0.125, query_positions=qpos, implementation="xla"
        )
    )
    rows = [("dense cache (xla)", timed(dense, k, v))]
    for block in (16, 32, 64, 128, 256):
        paged = looped(
            lambda q, table, qpos, kp, vp, block=block: attention.paged_attention(
                q, kp, vp, table, 0.125, query_positions=qpos, block_tokens=block
            )
        )
        rows.append((f"paged, {block}-token blocks", timed(paged, k_pool, v_pool)))
    print("\n| kernel | ms per layer and step |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")
    print(f"\nf32 matmul peak {peak / 1e9:.0f} GFLOP/s; load average {load_average():.1f} after")


if __name__ == "__main__":
    main()

"""The small model's training-step operations one at a time: XLA:CPU against PyTorch.

    python benchmarks/step_ops.py                 # study_mini's shapes (32 x 128 tokens)
    python benchmarks/step_ops.py --threads=1     # both on one core (taskset -c 0 too)

`profile_step.py` attributes our study_mini step's time to its operations;
this script times the costliest kinds alone, each as the step computes it
and as PyTorch's step does, interleaved (ours, theirs, ours, ...), medians of
`--repeats` calls after a warm-up, so that what is a backend's limit can be
told from what is our model's choice:

- forward product x @ W ([4096, 128] x [128, 384]): plain, both sides;
- weight gradient x^T @ dy ([4096, 128]^T x [4096, 384]): the contraction
  runs over the token axis, the major one of both operands. PyTorch hands
  BLAS a transposed view; XLA:CPU's dot takes row-major operands with the
  contraction minor, so it materialises a transpose;
- the same weight gradient with SwiGLU's backward (sigmoid, multiplies)
  feeding it, as in the MLP's backward: XLA fuses the elementwise work with
  the transposed write;
- attention's batched products (q.k and p.v over [B x heads, 128, 32]),
  as one einsum from the projections' [B, T, K, G, D] layout (as the model
  computed them before issue 17) and with the queries transposed first to
  [B, K, G, T, D] (as `layers.dot_product_attention` does now), and its
  masked softmax over [32, 2, 2, 128, 128].

The weight-gradient rows do not reproduce the step's slow case: inside the
step the transposed operand came out of the layer scan's saved activations
and XLA fused its transpose into their backward work (`profile_step.py`
shows it); `layers.cpu_matmul` now transposes the narrower operand on its own.

Each row gives the time, the rate (GFLOP/s for products, GB/s of operands
read and results written otherwise) and ours / PyTorch as a speed ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from benchlib import load_average, matmul_peak_flops  # sets the path first

import jax
import jax.numpy as jnp
import numpy as np

TOKENS, HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, BATCH, LENGTH = 4096, 128, 384, 4, 2, 32, 32, 128


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cases(rng: np.random.Generator):
    """name -> (ours, theirs, work, unit): zero-argument callables that run the op to
    completion, and its FLOPs (unit "GFLOP/s") or bytes moved ("GB/s")."""
    import torch

    f32 = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    x, dy, w = f32(TOKENS, HIDDEN), f32(TOKENS, MLP), f32(HIDDEN, MLP)
    gate, up = f32(TOKENS, MLP), f32(TOKENS, MLP)
    q = f32(BATCH, LENGTH, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    k, v = f32(BATCH, KV_HEADS, LENGTH, HEAD_DIM), f32(BATCH, KV_HEADS, HEAD_DIM, LENGTH)
    logits = f32(BATCH, KV_HEADS, HEADS // KV_HEADS, LENGTH, LENGTH)
    causal = np.tril(np.ones((LENGTH, LENGTH), bool))

    def pair(ours_fn, theirs_fn, *args):
        """(ours, theirs): each op jitted / eager on its own copies of `args`, run to completion."""
        jitted, jax_args = jax.jit(ours_fn), [jnp.asarray(a) for a in args]
        torch_args = [torch.from_numpy(a) for a in args]
        return (
            lambda: jax.block_until_ready(jitted(*jax_args)),
            lambda: theirs_fn(*torch_args),
        )

    def swiglu_grad(gate, up, dy):  # d(down's input)/d(gate) * dy, as the MLP's backward
        s = 1 / (1 + jnp.exp(-gate))
        return dy * up * s * (1 + gate * (1 - s))

    def swiglu_grad_torch(gate, up, dy):
        s = torch.sigmoid(gate)
        return dy * up * s * (1 + gate * (1 - s))

    q_first = lambda a: jnp.transpose(a, (0, 2, 3, 1, 4))  # [B, T, K, G, D] -> [B, K, G, T, D]
    q_first_inverse = lambda a: jnp.transpose(a, (0, 3, 1, 2, 4))
    torch_qk = lambda a, b: torch.einsum("btkgd,bksd->bkgts", a, b)
    torch_pv = lambda p, b: torch.einsum("bkgts,bkds->btkgd", p, b)
    masked_softmax = lambda z, m: jax.nn.softmax(jnp.where(m, z, -1e30), axis=-1)
    matmul_flops = 2 * TOKENS * HIDDEN * MLP
    bhts = BATCH * HEADS * LENGTH * LENGTH
    attention_flops = 2 * bhts * HEAD_DIM
    return {
        "forward product x @ W [4096,128]x[128,384]": (
            *pair(jnp.matmul, torch.mm, x, w),
            matmul_flops,
            "GFLOP/s",
        ),
        "weight gradient x^T @ dy [4096,128]^T x [4096,384]": (
            *pair(lambda a, b: a.T @ b, lambda a, b: a.t() @ b, x, dy),
            matmul_flops,
            "GFLOP/s",
        ),
        "weight gradient fed by SwiGLU's backward": (
            *pair(
                lambda a, g, u, d: a.T @ swiglu_grad(g, u, d),
                lambda a, g, u, d: a.t() @ swiglu_grad_torch(g, u, d),
                x,
                gate,
                up,
                dy,
            ),
            matmul_flops,
            "GFLOP/s",
        ),
        "attention q.k [32,128,2,2,32] x [32,2,128,32]": (
            *pair(lambda a, b: jnp.einsum("btkgd,bksd->bkgts", a, b), torch_qk, q, k),
            attention_flops,
            "GFLOP/s",
        ),
        "attention q.k, q laid out [B,K,G,T,D] first (the model's way)": (
            *pair(lambda a, b: jnp.einsum("bkgtd,bksd->bkgts", q_first(a), b), torch_qk, q, k),
            attention_flops,
            "GFLOP/s",
        ),
        "attention p.v [32,2,2,128,128] x [32,2,32,128]": (
            *pair(lambda p, b: jnp.einsum("bkgts,bkds->btkgd", p, b), torch_pv, logits, v),
            attention_flops,
            "GFLOP/s",
        ),
        "attention p.v, then [B,K,G,T,D] -> [B,T,K,G,D] (the model's way)": (
            *pair(
                lambda p, b: q_first_inverse(jnp.einsum("bkgts,bkds->bkgtd", p, b)),
                torch_pv,
                logits,
                v,
            ),
            attention_flops,
            "GFLOP/s",
        ),
        "masked softmax [32,2,2,128,128]": (
            *pair(
                masked_softmax,
                lambda z, m: torch.softmax(z.masked_fill(~m, -1e30), dim=-1),
                logits,
                causal,
            ),
            2 * 4 * bhts,  # float32 logits read, probabilities written
            "GB/s",
        ),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=31, help="timed calls of each, interleaved")
    parser.add_argument(
        "--threads", type=int, default=0, help="PyTorch's intra-op threads (0: its default)"
    )
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    cases = _cases(np.random.default_rng(0))
    for ours, theirs, _, _ in cases.values():  # compile, first allocations
        for _ in range(3):
            ours(), theirs()
    peak = matmul_peak_flops()
    print(
        f"load average {load_before:.2f} before; f32 matmul peak {peak / 1e9:.0f} GFLOP/s;"
        f" PyTorch threads {torch.get_num_threads()}; CPUs usable {len(os.sched_getaffinity(0))};"
        f" medians of {args.repeats} interleaved calls"
    )
    print(
        "| operation | ours (ms) | PyTorch (ms) | ours | PyTorch | ours / PyTorch speed |\n"
        "|---|---|---|---|---|---|"
    )
    for name, (ours, theirs, work, unit) in cases.items():
        times = {"ours": [], "theirs": []}
        for _ in range(args.repeats):
            times["ours"].append(_timed(ours))
            times["theirs"].append(_timed(theirs))
        a, b = statistics.median(times["ours"]), statistics.median(times["theirs"])
        print(
            f"| {name} | {1e3 * a:.3f} | {1e3 * b:.3f} | {work / a / 1e9:.1f} {unit} |"
            f" {work / b / 1e9:.1f} {unit} | {b / a:.2f}x |"
        )
    print(f"load average {load_average():.2f} after")


if __name__ == "__main__":
    main()

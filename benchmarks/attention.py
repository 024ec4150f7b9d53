"""Attention kernels on CPU: the dense XLA attention against the blockwise one (issue 29).

    python benchmarks/attention.py ops                 # attention alone, fwd + bwd, block sweep
    python benchmarks/attention.py decode              # one decode step's attention over a cache
    python benchmarks/attention.py decode --written 0.1,0.5,0.9   # with more or less of it written
    python benchmarks/attention.py step                # the SFT step, 128/256/512 tokens, and 4,096
    python benchmarks/attention.py memory              # Gemma 3 270M training step, peak RSS
    python benchmarks/attention.py decode-memory       # Gemma 3 270M prefill + decode, peak RSS
    python benchmarks/attention.py curve               # 50 SFT steps' losses with either kernel
    python benchmarks/attention.py compiled            # the same steps' XLA buffer sizes, not run
    python benchmarks/attention.py compiled-decode     # the sampler's program at cache 4,096, 16,384
    python benchmarks/attention.py memory --lengths=2048,4096 --impls=xla,blockwise

`ops` and `step` time both kernels in one process, interleaved (xla,
blockwise, xla, ...), medians of `--repeats` calls after two warm-up calls,
and print the 1-minute load average and the float32 matmul peak read before
and after. `memory` and `decode-memory` run every configuration in a fresh
subprocess (this script with `--child`) and print its peak RSS beside the RSS
once the parameters (and optimizer state) exist: their difference is what the
step itself needs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import load_average, matmul_peak_flops, peak_rss_bytes  # sets the path first

from rl_reason.models import attention

GIB = 1 << 30


def machine() -> str:
    return f"load {load_average():.2f}, fp32 matmul peak {matmul_peak_flops() / 1e9:.0f} GFLOP/s"


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each zero-argument callable, called in turn `repeats` times."""
    for fn in fns.values():
        fn(), fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


# --- attention alone -------------------------------------------------------------------


def ops(args):
    """Fwd + bwd of attention alone, study_mini's heads (4 over 2 KV heads, head_dim 32)."""
    print(f"# attention fwd+bwd alone, before: {machine()}")
    rng = np.random.default_rng(0)
    heads, kv_heads, dim = 4, 2, 32
    for length, batch in ((128, 32), (256, 16), (512, 8), (1024, 4), (2048, 2), (4096, 1)):
        f32 = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))
        q = f32(batch, length, heads, dim)
        k, v = f32(batch, kv_heads, length, dim), f32(batch, kv_heads, dim, length)
        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        ct = f32(batch, length, heads, dim)

        def make(impl, bq=0, bk=0):
            def loss(q, k, v):
                out = attention.attend(
                    q,
                    [(k, v, pos)],
                    0.17,
                    query_positions=pos,
                    implementation=impl,
                    block_q=bq,
                    block_k=bk,
                )
                return jnp.sum(out * ct)

            fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            return lambda: jax.block_until_ready(fn(q, k, v))

        fns = {"xla": make("xla")}
        blocks = [
            (b, c)
            for b in (128, 256, 512)
            for c in (128, 256, 512, 1024)
            if b <= length and c <= length
        ]
        blocks = blocks or [(length, length)]
        if args.quick:
            blocks = [attention.block_sizes(length, length)]
        for bq, bk in blocks:
            fns[f"blockwise {bq}x{bk}"] = make("blockwise", bq, bk)
        med = interleaved(fns, args.repeats)
        base = med["xla"]
        cells = ", ".join(f"{n} {t * 1e3:.1f} ms ({base / t:.2f}x)" for n, t in med.items())
        print(f"T={length} B={batch}: {cells}; {machine()}", flush=True)


def decode(args):
    """One decode step's attention (one query per row) over a cache of which a fraction
    (`--written`, default a half; several: "0.1,0.5,0.9") is written."""
    print(f"# decode attention alone (forward), before: {machine()}")
    rng = np.random.default_rng(0)
    fractions = [float(f) for f in args.written.split(",")]
    for (heads, kv_heads, dim, batch, slots), fraction in itertools.product(
        (
            (4, 2, 32, 32, 640),
            (12, 4, 64, 32, 640),
            (12, 4, 64, 32, 4096),
            (4, 1, 256, 1, 16384),
        ),
        fractions,
    ):
        f32 = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))
        q = f32(batch, 1, heads, dim)
        k, v = f32(batch, kv_heads, slots, dim), f32(batch, kv_heads, dim, slots)
        written = int(slots * fraction)
        cache_pos = jnp.where(jnp.arange(slots) < written, jnp.arange(slots), -1)
        cache_pos = jnp.broadcast_to(cache_pos.astype(jnp.int32), (batch, slots))
        qpos = jnp.full((batch, 1), written, jnp.int32)
        nk, nv = f32(batch, kv_heads, 1, dim), f32(batch, kv_heads, dim, 1)

        def make(impl):
            fn = jax.jit(
                lambda q, k, v, nk, nv: attention.attend(
                    q,
                    [(k, v, cache_pos), (nk, nv, qpos)],
                    0.17,
                    query_positions=qpos,
                    implementation=impl,
                )
            )
            return lambda: jax.block_until_ready(fn(q, k, v, nk, nv))

        med = interleaved({"xla": make("xla"), "blockwise": make("blockwise")}, args.repeats)
        print(
            f"H={heads}/{kv_heads}x{dim} B={batch} cache {slots} ({written} written): xla"
            f" {med['xla'] * 1e3:.2f} ms, blockwise {med['blockwise'] * 1e3:.2f} ms"
            f" ({med['xla'] / med['blockwise']:.2f}x); {machine()}",
            flush=True,
        )


# --- the training step -----------------------------------------------------------------


def step(args):
    """The SFT step (AdamW) of the default job's model with either kernel, interleaved."""
    from train_step import jax_step, make_batch, study_mini

    from rl_reason.parallel import sharding as shd

    print(f"# SFT step, study_mini (4 layers, 128 wide, 4/2 heads x 32), before: {machine()}")
    for length, batch in [tuple(map(int, s.split("x")))[::-1] for s in args.shapes.split(",")]:
        steps = {}
        for impl in ("xla", "blockwise"):
            config = study_mini().replace(attention=impl)
            state, fn, mesh = jax_step(config, chunk=128)
            data = shd.shard_batch(make_batch(config, batch, length), mesh)
            holder = {"state": state}

            def one(fn=fn, holder=holder, data=data):
                holder["state"], metrics = fn(holder["state"], data)
                jax.block_until_ready((holder["state"], metrics))

            steps[impl] = one
        med = interleaved(steps, args.repeats)
        print(
            f"{batch} x {length}: xla {med['xla'] * 1e3:.1f} ms, blockwise"
            f" {med['blockwise'] * 1e3:.1f} ms, blockwise speed {med['xla'] / med['blockwise']:.2f}x"
            f" of xla; {machine()}",
            flush=True,
        )


def curve(args):
    """50 SFT steps of the default job's model at 8 x 256 tokens (blockwise under "auto")
    with each kernel from the same start: the two loss curves side by side."""
    from train_step import jax_step, make_batch, study_mini

    from rl_reason.parallel import sharding as shd

    losses = {}
    for impl in ("xla", "blockwise"):
        config = study_mini().replace(attention=impl)
        state, fn, mesh = jax_step(config, chunk=128)
        losses[impl] = []
        for i in range(args.steps):
            batch = make_batch(config, 8, 256, seed=i)
            batch["input_mask"][:, : (i % 5) * 16] = False  # left padding, varying
            batch["loss_mask"] = batch["input_mask"].copy()
            state, metrics = fn(state, shd.shard_batch(batch, mesh))
            losses[impl].append(float(metrics["loss"]))
    a, b = np.array(losses["xla"]), np.array(losses["blockwise"])
    print(f"# {args.steps} SFT steps, study_mini, 8 x 256, lr 1e-4; {machine()}")
    print(f"xla first/last loss {a[0]:.6f} / {a[-1]:.6f}; blockwise {b[0]:.6f} / {b[-1]:.6f}")
    print(
        f"max |difference| {np.abs(a - b).max():.3g}, max relative {np.abs(a - b).max() / a.min():.3g}"
    )
    print("xla      ", " ".join(f"{x:.6f}" for x in a[::7]))
    print("blockwise", " ".join(f"{x:.6f}" for x in b[::7]))


# --- memory (one configuration per fresh process) --------------------------------------


def child_memory(args):
    """One Gemma 3 270M-shape training step (random weights), batch 1: JSON line."""
    from train_step import jax_step, make_batch

    from rl_reason.models.config import gemma3_270m
    from rl_reason.parallel import sharding as shd

    config = gemma3_270m(attention=args.impl, remat=args.remat)
    state, fn, mesh = jax_step(config, chunk=args.chunk)
    data = shd.shard_batch(make_batch(config, 1, args.length), mesh)
    jax.block_until_ready(state)
    base = peak_rss_bytes()
    start = time.perf_counter()
    state, metrics = fn(state, data)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            dict(
                impl=args.impl,
                length=args.length,
                remat=args.remat,
                rss_state_gib=base / GIB,
                peak_gib=peak_rss_bytes() / GIB,
                step_s=seconds,
                loss=float(metrics["loss"]),
            )
        )
    )


def child_decode(args):
    """Prefill of (cache length - new) tokens and `new` greedy decode steps, batch 1."""
    from benchlib import init_params

    from rl_reason.models.config import gemma3_270m
    from rl_reason.models.transformer import Transformer
    from rl_reason.sampling.sampler import SamplingConfig, sample_jit

    config = gemma3_270m(attention=args.impl)
    params = init_params(config, 0)
    jax.block_until_ready(params)
    base = peak_rss_bytes()
    model = Transformer(config.replace(scan_layers=False))
    prompt = args.length - args.new
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 1000, (1, prompt)), jnp.int32)
    sampling = SamplingConfig(max_new_tokens=args.new, temperature=0.0, min_rows=0)
    start = time.perf_counter()
    out = sample_jit(
        model, params, tokens, jnp.ones_like(tokens, bool), jax.random.PRNGKey(0), sampling
    )
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            dict(
                impl=args.impl,
                cache=args.length,
                new=args.new,
                rss_params_gib=base / GIB,
                peak_gib=peak_rss_bytes() / GIB,
                seconds_with_compile=seconds,
            )
        )
    )


def compiled(args):
    """XLA's own account of the step's buffers, compiled but not run (one process).

    For each (implementation, length): the Gemma 3 270M-shape training step
    (batch 1, remat as configured) and the sampler's prefill + decode program
    (batch 1), lowered on abstract arguments; `temp` is the scratch memory
    the compiled program allocates beside its arguments and outputs (the
    parameters, optimizer state and cache), i.e. what the step itself needs.
    """
    from benchlib import init_params
    from train_step import jax_adamw, one_device_mesh

    from rl_reason.algorithms import sft
    from rl_reason.algorithms import train_state as ts
    from rl_reason.models.config import gemma3_270m
    from rl_reason.models.transformer import Transformer
    from rl_reason.parallel import sharding as shd
    from rl_reason.sampling.sampler import SamplingConfig, sample_jit

    print(f"# compiled memory (XLA memory_analysis), before: {machine()}", flush=True)
    mesh = one_device_mesh()
    for length in map(int, args.lengths.split(",")):
        for impl in args.impls.split(","):
            config = gemma3_270m(attention=impl, remat=args.remat)
            model = Transformer(config)
            tx = jax_adamw()
            if args.what == "compiled":
                shardings = ts.state_shardings(model, tx, mesh, shd.DEFAULT_RULES)
                state = jax.eval_shape(
                    lambda: ts.create_train_state(model, tx, mesh, shd.DEFAULT_RULES, seed=0)
                )
                step = ts.jit_step(
                    sft.make_sft_step(model, tx, chunk_size=args.chunk),
                    mesh,
                    shd.DEFAULT_RULES,
                    shardings,
                )
                tokens = np.zeros((1, length), np.int32)  # small; the state stays abstract
                masks = np.ones((1, length), bool)
                batch = {"tokens": tokens, "input_mask": masks, "loss_mask": masks}
                lowered = step.lower(state, batch)
                what = f"train step T={length}"
            else:
                params = jax.eval_shape(lambda: init_params(config, 0))
                decoder = Transformer(config.replace(scan_layers=False))
                prompt = length - args.new
                sampling = SamplingConfig(max_new_tokens=args.new, temperature=0.0, min_rows=0)
                tokens = jax.ShapeDtypeStruct((1, prompt), jnp.int32)
                masks = jax.ShapeDtypeStruct((1, prompt), jnp.bool_)
                lowered = sample_jit.lower(
                    decoder, params, tokens, masks, jax.random.PRNGKey(0), sampling
                )
                what = f"prefill {prompt} + {args.new} decode steps, cache {length}"
            start = time.perf_counter()
            m = lowered.compile().memory_analysis()
            print(
                f"{what} {impl}: temp {m.temp_size_in_bytes / GIB:.3f} GiB, arguments"
                f" {m.argument_size_in_bytes / GIB:.3f} GiB, outputs {m.output_size_in_bytes / GIB:.3f}"
                f" GiB (compiled in {time.perf_counter() - start:.0f} s; load {load_average():.2f})",
                flush=True,
            )


def memory(args, which):
    print(f"# {which}: fresh process per configuration; before: {machine()}", flush=True)
    for length in map(int, args.lengths.split(",")):
        for impl in args.impls.split(","):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                which,
                "--child",
                f"--impl={impl}",
                f"--length={length}",
                f"--remat={args.remat}",
                f"--new={args.new}",
                f"--chunk={args.chunk}",
            ]
            load = load_average()
            run = subprocess.run(cmd, capture_output=True, text=True)
            line = (
                run.stdout.strip().splitlines()[-1]
                if run.returncode == 0 and run.stdout.strip()
                else (f"failed ({run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
            )
            print(f"{line}  [load before {load:.2f}]", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what",
        choices=(
            "ops",
            "decode",
            "step",
            "memory",
            "decode-memory",
            "compiled",
            "compiled-decode",
            "curve",
        ),
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="ops: the default blocks only")
    parser.add_argument(
        "--shapes", default="32x128,16x256,8x512,1x4096", help="step: batch x length"
    )
    parser.add_argument("--lengths", default="")
    parser.add_argument("--impls", default="xla,blockwise")
    parser.add_argument("--remat", default="dots")
    parser.add_argument("--chunk", type=int, default=256, help="loss chunk (positions)")
    parser.add_argument("--steps", type=int, default=50, help="curve: SFT steps")
    parser.add_argument("--new", type=int, default=512, help="decode steps")
    parser.add_argument("--written", default="0.5", help="decode: fractions of the cache written")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--impl", default="blockwise")
    parser.add_argument("--length", type=int, default=0)
    args = parser.parse_args()
    if args.what == "ops":
        ops(args)
    elif args.what == "decode":
        decode(args)
    elif args.what == "curve":
        curve(args)
    elif args.what == "step":
        step(args)
    elif args.what.startswith("compiled"):
        args.lengths = args.lengths or (
            "2048,4096,8192" if args.what == "compiled" else "4096,16384"
        )
        compiled(args)
    elif args.child:
        (child_memory if args.what == "memory" else child_decode)(args)
    else:
        args.lengths = args.lengths or ("2048,4096,8192" if args.what == "memory" else "4096,16384")
        memory(args, args.what)


if __name__ == "__main__":
    main()

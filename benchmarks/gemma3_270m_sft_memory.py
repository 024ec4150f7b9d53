"""Peak resident memory of SFT steps on Gemma 3 270M, on one CPU device.

    python benchmarks/gemma3_270m_sft_memory.py          # batch 8 x 256, real weights, remat
    python benchmarks/gemma3_270m_sft_memory.py --remat=none --chunk=64 --weights=random

Imports the GGUF weights (or initialises randomly), builds the AdamW train
state and runs jitted SFT steps, then prints one JSON line: the process's
peak RSS (import included), the RSS after import, step times and losses.
The 262k vocabulary never yields [batch, length, vocab] logits: the SFT loss
unembeds --chunk positions at a time.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from benchlib import peak_rss_bytes  # sets this checkout's path first

from rl_reason.algorithms import optimizer, sft
from rl_reason.algorithms import train_state as ts
from rl_reason.experiments.config import base_config
from rl_reason.models.config import gemma3_270m
from rl_reason.models.gemma3_270m import load_gemma3_270m
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=16, help="loss chunk (positions)")
    parser.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    parser.add_argument("--weights", default="gguf", choices=("gguf", "random"))
    args = parser.parse_args()

    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    if args.weights == "gguf":
        config, params, _ = load_gemma3_270m(mesh, with_tokenizer=False, remat=args.remat)
    else:
        config, params = gemma3_270m(remat=args.remat), None
    rss_after_import = peak_rss_bytes()
    model = Transformer(config)
    optim = base_config().optim
    tx, _ = optimizer.make_optimizer(optim, 100)
    state = ts.create_train_state(model, tx, mesh, shd.DEFAULT_RULES, seed=0, params=params)
    del params  # the state holds its own copy
    step = ts.jit_step(
        sft.make_sft_step(model, tx, chunk_size=args.chunk),
        mesh,
        shd.DEFAULT_RULES,
        ts.state_shardings(model, tx, mesh, shd.DEFAULT_RULES),
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (args.batch, args.length)).astype(np.int32)
    ones = np.ones_like(tokens, bool)
    batch = shd.shard_batch({"tokens": tokens, "input_mask": ones, "loss_mask": ones}, mesh)
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "batch": args.batch,
                "length": args.length,
                "chunk": args.chunk,
                "remat": args.remat,
                "weights": args.weights,
                "peak_rss_gb": peak_rss_bytes() / 1e9,
                "peak_rss_after_import_gb": rss_after_import / 1e9,
                "step_seconds": times,
                "losses": losses,
            }
        )
    )


if __name__ == "__main__":
    main()

"""SFT step throughput against a PyTorch training step, on the same model and batch.

    python benchmarks/train_step.py                      # 56M Llama, 8 x 256 tokens
    python benchmarks/train_step.py --preset=llama_50m --batch=8 --length=256 --steps=5

Reports tokens/s of our jitted step and of transformers' LlamaForCausalLM with
torch.optim.AdamW (same config, batch, sequence length), their ratio, and
each one's model FLOPs utilisation against the machine's matmul peak, which
it measures in the same run.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from benchlib import load_average, matmul_peak_flops, train_flops_per_token  # sets the path first

from rl_reason.algorithms import optimizer, sft
from rl_reason.algorithms import train_state as ts
from rl_reason.experiments.config import base_config
from rl_reason.models.config import PRESETS, ModelConfig
from rl_reason.models.hf_config import hf_config_dict
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd


def _batch(config, batch, length, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32)
    ones = np.ones_like(tokens, bool)
    return {"tokens": tokens, "input_mask": ones, "loss_mask": ones}


def time_jax(config: ModelConfig, batch: int, length: int, steps: int, chunk: int) -> float:
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = Transformer(config)
    optim = base_config().optim  # AdamW as the PyTorch step: lr 1e-4, constant
    optim.update(lr=1e-4, schedule="constant", warmup_steps=0)
    tx, _ = optimizer.make_optimizer(optim, steps)
    state = ts.create_train_state(model, tx, mesh, shd.DEFAULT_RULES, seed=0)
    step = ts.jit_step(
        sft.make_sft_step(model, tx, chunk_size=chunk),
        mesh,
        shd.DEFAULT_RULES,
        ts.state_shardings(model, tx, mesh, shd.DEFAULT_RULES),
    )
    data = shd.shard_batch(_batch(config, batch, length), mesh)
    state, metrics = step(state, data)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    return batch * length * steps / (time.perf_counter() - start)


def time_torch(config: ModelConfig, batch: int, length: int, steps: int) -> float:
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        **hf_config_dict(config, {"max_position_embeddings": max(length, 2048)})
    )
    model = transformers.LlamaForCausalLM(hf_config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    tokens = torch.from_numpy(_batch(config, batch, length)["tokens"]).long()

    def one_step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    one_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    return batch * length * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama_50m", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss-chunk", type=int, default=256)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    config = PRESETS[args.preset]()
    peak = matmul_peak_flops()
    flops = train_flops_per_token(config, args.length)
    rows = [
        (
            "rl_reason sft_step (JAX)",
            time_jax(config, args.batch, args.length, args.steps, args.loss_chunk),
        )
    ]
    if not args.skip_torch:
        rows.append(
            (
                "PyTorch LlamaForCausalLM + AdamW",
                time_torch(config, args.batch, args.length, args.steps),
            )
        )

    print(
        f"model {args.preset}: {config.num_params() / 1e6:.1f}M params, batch {args.batch} x {args.length}"
        f" tokens, {args.steps} timed steps; matmul peak {peak / 1e9:.0f} GFLOP/s (f32);"
        f" load average {load_average():.1f}"
    )
    print(f"| step | tokens/s | MFU |\n|---|---|---|")
    for name, tps in rows:
        print(f"| {name} | {tps:.0f} | {100 * tps * flops / peak:.1f}% |")
    if len(rows) == 2:
        print(f"speed-up over PyTorch: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()

"""The PPO update against the same update written on PyTorch, one rollout batch, interleaved.

    python benchmarks/ppo_update.py                        # study_mini, 32 rows x 128 tokens
    python benchmarks/ppo_update.py --shape=llama_50m      # 8 x 256
    python benchmarks/ppo_update.py --shape=study_mini --epochs=2 --minibatches=2

What one PPO optimizer step computes, on the shapes of `train_step.py`, the
second half of every row a completion: the policy's log-probs and (as a
metric, no gradient) entropies of the completion tokens, the value head's
values on the shared trunk, the clipped policy loss on whitened advantages,
the clipped value loss (vf_coef 0.5, clip 0.2), the backward pass, global
norm clipping at 1.0 and AdamW (lr 1e-4, betas 0.9/0.95, weight decay 0.01).

- ours: `ppo.ppo_update` (epochs x minibatches in one jitted program) through
  `ts.jit_step`, old log-probs and values from `ppo.score`.
- PyTorch: transformers' LlamaForCausalLM with a linear value head on its
  final hidden state, the same losses written as TRL's PPO trainer writes
  them (`masked_whiten`, `clamp`, `max` of the two terms), the same
  minibatch loop and optimizer; its old log-probs and values from its own
  forward. (TRL itself is not used: its trainer also samples, which the
  update step does not; this is its inner loop.)

Reported as `train_step.py` does: medians of `--steps` interleaved updates
after two warm-up ones, tokens/s, the ratio, load average and matmul peak.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import jax
import numpy as np
from benchlib import load_average, matmul_peak_flops  # sets the path first
from train_step import (
    SHAPES,
    jax_adamw,
    make_batch,
    one_device_mesh,
    timed,
    torch_adamw,
    torch_model,
)

from rl_reason.algorithms import ppo
from rl_reason.algorithms import train_state as ts
from rl_reason.models.config import ModelConfig
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import sharding as shd

CLIP, VALUE_CLIP, VF_COEF = 0.2, 0.2, 0.5


def rollout(config: ModelConfig, batch: int, length: int) -> dict[str, np.ndarray]:
    """Tokens, masks (the second half of each row is the completion), advantages, returns."""
    rng = np.random.default_rng(1)
    data = make_batch(config, batch, length)
    data["loss_mask"] = np.zeros_like(data["loss_mask"])
    data["loss_mask"][:, length // 2 :] = True
    data["advantages"] = rng.standard_normal((batch, length)).astype(np.float32)
    data["returns"] = rng.standard_normal((batch, length)).astype(np.float32)
    return data


def build_jax(config: ModelConfig, data: dict, epochs: int, minibatches: int, chunk: int):
    mesh = one_device_mesh()
    models = ppo.ActorCritic(Transformer(config.replace(heads=("value",))))
    tx = jax_adamw()
    pc = ppo.PPOConfig(
        clip_eps=CLIP,
        value_clip=VALUE_CLIP,
        vf_coef=VF_COEF,
        num_epochs=epochs,
        num_minibatches=minibatches,
        chunk_size=chunk,
    )
    rules = shd.DEFAULT_RULES
    state = ppo.create_ppo_state(models, tx, mesh, rules, seed=0)
    batch = shd.shard_batch(data, mesh)
    batch.update(
        jax.jit(functools.partial(ppo.score, models, chunk_size=chunk))(state.params, None, batch)
    )
    update = ts.jit_step(
        ppo.make_ppo_update(models, tx, pc),
        mesh,
        rules,
        ppo.ppo_state_shardings(models, tx, mesh, rules),
    )
    holder = {"state": state}

    def one_update():
        holder["state"], metrics = update(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    return one_update


def build_torch(config: ModelConfig, data: dict, epochs: int, minibatches: int):
    import torch

    policy = torch_model(config, data["tokens"].shape[1])
    value_head = torch.nn.Linear(config.hidden_dim, 1)
    params = [*policy.parameters(), *value_head.parameters()]
    opt = torch_adamw(params)
    tokens = torch.from_numpy(data["tokens"]).long()
    valid = torch.from_numpy(data["loss_mask"])[:, 1:]  # targets: tokens 1..L-1
    advantages = torch.from_numpy(data["advantages"])[:, 1:]
    returns = torch.from_numpy(data["returns"])[:, 1:]

    def forward(rows):
        out = policy(input_ids=tokens[rows], output_hidden_states=True)
        logits = out.logits[:, :-1]
        logprobs = torch.log_softmax(logits, -1)
        token_logprobs = logprobs.gather(-1, tokens[rows, 1:, None]).squeeze(-1)
        with torch.no_grad():  # a metric, as ours computes it
            entropy = -(logprobs.exp() * logprobs).sum(-1)
        values = value_head(out.hidden_states[-1][:, :-1]).squeeze(-1)
        return token_logprobs, values, entropy

    with torch.no_grad():
        old_logprobs, old_values, _ = forward(slice(None))
    mask = valid.float()
    mean = (advantages * mask).sum() / mask.sum()
    var = (((advantages - mean) ** 2) * mask).sum() / mask.sum()
    whitened = (advantages - mean) * torch.rsqrt(var + 1e-8)
    rows = tokens.shape[0]

    def one_update():
        for _ in range(epochs):
            order = torch.randperm(rows)
            for i in range(minibatches):
                mb = order[i::minibatches]
                logprobs, values, entropy = forward(mb)
                m = mask[mb]
                n = m.sum()
                ratio = torch.exp(logprobs - old_logprobs[mb])
                adv = whitened[mb]
                pg = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
                clipped_values = torch.clamp(
                    values, old_values[mb] - VALUE_CLIP, old_values[mb] + VALUE_CLIP
                )
                vf = 0.5 * torch.max(
                    (values - returns[mb]) ** 2, (clipped_values - returns[mb]) ** 2
                )
                loss = ((pg + VF_COEF * vf) * m).sum() / n
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                _ = (entropy * m).sum() / n  # logged, as ours logs it

    return one_update


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="study_mini", choices=["study_mini", "llama_50m"])
    parser.add_argument("--steps", type=int, default=7, help="timed updates of each system")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--loss-chunk", type=int, default=256)
    parser.add_argument("--torch-threads", type=int, default=0)
    args = parser.parse_args()
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    make_config, batch, length = SHAPES[args.shape]
    config = make_config()
    data = rollout(config, batch, length)
    loads = [load_average()]
    systems = {
        "rl_reason ppo_update (JAX)": build_jax(
            config, data, args.epochs, args.minibatches, args.loss_chunk
        ),
        "PyTorch LlamaForCausalLM + value head + AdamW": build_torch(
            config, data, args.epochs, args.minibatches
        ),
    }
    first = {k: timed(step) for k, step in systems.items()}
    for step in systems.values():
        step()
    peak = matmul_peak_flops()
    times = {k: [] for k in systems}
    for _ in range(args.steps):
        for k, step in systems.items():
            times[k].append(timed(step))
    loads.append(load_average())
    tokens = batch * length * args.epochs
    print(
        f"model {args.shape}: {config.num_params() / 1e6:.1f}M params + value head,"
        f" remat {config.remat}, {batch} rows x {length} tokens (completions the second half),"
        f" {args.epochs} epoch(s) x {args.minibatches} minibatch(es) an update;"
        f" {args.steps} timed updates each, interleaved; torch threads {torch.get_num_threads()}"
    )
    print(
        f"f32 matmul peak {peak / 1e9:.0f} GFLOP/s; load average {loads[0]:.2f} before,"
        f" {loads[1]:.2f} after"
    )
    print("| update | first call (s) | median (s) | min / max (s) | tokens/s |")
    print("|---|---|---|---|---|")
    medians = {}
    for k, ts_ in times.items():
        medians[k] = m = statistics.median(ts_)
        spread = f"{min(ts_):.3f} / {max(ts_):.3f}"
        print(f"| {k} | {first[k]:.2f} | {m:.3f} | {spread} | {tokens / m:.0f} |")
    ours, theirs = medians.values()
    print(f"speed-up over PyTorch (median update time ratio): {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()

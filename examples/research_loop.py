"""The pieces from research code: SFT steps, then one GRPO iteration, in plain Python.

    PYTHONPATH=. python examples/research_loop.py

A tiny Llama on the built-in synthetic arithmetic task (seconds on a CPU;
the numbers it prints mean nothing at this size). Every call is the one the
launchers' loops make (`experiments/on_policy.py`, `OnPolicyLearner.iteration`,
is the same iteration with checkpoints, logging and evaluation around it):

  sample K completions per prompt  -> `Sampler.generate`
  reward them                      -> `rewards.compose`
  group advantages                 -> `grpo.group_token_advantages`
  policy and reference log-probs   -> `ppo.score`
  the clipped update, jitted       -> `ppo.make_ppo_update` via `train_state.jit_step`
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rl_reason.algorithms import grpo, optimizer, ppo, sft
from rl_reason.algorithms import train_state as ts
from rl_reason.data import sft as sft_data
from rl_reason.data import synthetic, templates
from rl_reason.data.tokenizer import train_tokenizer
from rl_reason.experiments.config import base_config
from rl_reason.models.config import tiny_llama
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose
from rl_reason.sampling.engine import Sampler


def main(sft_steps: int = 40, num_prompts: int = 8, k: int = 4, seed: int = 0) -> dict:
    # The task, its tokenizer and a tiny model, on every device this process sees.
    examples = synthetic.generate("train", 64, seed=seed)
    prompts = [templates.format_prompt(ex["question"]) for ex in examples]
    solutions = [templates.format_completion(ex["answer"]) for ex in examples]
    tokenizer = train_tokenizer(prompts + solutions, vocab_size=300)
    mesh, rules = mesh_lib.make_mesh((-1, 1, 1)), shd.DEFAULT_RULES
    model = Transformer(tiny_llama(vocab_size=len(tokenizer)))

    # --- SFT: the optimizer from an ml_collections `optim` section, one jitted step.
    optim = base_config().optim  # lr, schedule, warm-up, AdamW, clipping
    optim.lr, optim.warmup_steps = 3e-3, 0
    tx, schedule = optimizer.make_optimizer(optim, total_steps=sft_steps)
    state = ts.create_train_state(model, tx, mesh, rules, seed=seed)
    sft_step = ts.jit_step(
        sft.make_sft_step(model, tx, lr_schedule=schedule),
        mesh,
        rules,
        ts.state_shardings(model, tx, mesh, rules),
    )
    pairs = sft_data.encode_pairs(tokenizer, prompts[:32], solutions[:32])
    batch, _ = sft_data.pack_pairs(pairs, max_length=128, pad_id=sft_data.pad_id(tokenizer))
    for _ in range(sft_steps):
        state, sft_metrics = sft_step(state, batch)  # the state is donated: use the new one
    print(f"SFT: loss {float(sft_metrics['loss']):.3f} after {sft_steps} steps")

    # --- One GRPO iteration from the SFT model (the frozen reference).
    ref_params = state.params
    models = ppo.ActorCritic(model)  # no value head: GRPO needs no critic
    config = grpo.grpo_ppo_config()  # k3 KL loss (beta 0.04), one epoch, one minibatch
    rl_optim = base_config().optim
    rl_optim.lr, rl_optim.warmup_steps = 1e-4, 0  # no warm-up: it would start at rate 0
    rl_tx, rl_schedule = optimizer.make_optimizer(rl_optim, total_steps=1)
    policy = jax.tree.map(jnp.copy, ref_params)  # the update donates the policy's buffers
    rl_state = ppo.create_ppo_state(models, rl_tx, mesh, rules, seed, params=policy)
    update = ts.jit_step(
        ppo.make_ppo_update(models, rl_tx, config, lr_schedule=rl_schedule),
        mesh,
        rules,
        ppo.ppo_state_shardings(models, rl_tx, mesh, rules),
    )

    sampler = Sampler(
        model.config, tokenizer, batch_size=num_prompts, prompt_buckets=(128,), mesh=mesh,
        rules=rules, stop_strings=templates.STOP_SEQUENCES,
    )  # fmt: skip
    sampling = sampler.sampling_config(max_new_tokens=48, temperature=1.0, num_samples=k)
    rollout_rng = jax.random.PRNGKey(seed + 1)
    with shd.activation_sharding(mesh, rules):
        samples = sampler.generate(rl_state.params, prompts[:num_prompts], rollout_rng, sampling)

    # Rewards see every column of the example, each row repeated K times (prompt-major).
    reward_fn = compose.compose({"correctness": 1.0, "format": 0.1})  # names and weights
    rows = [ex for ex in examples[:num_prompts] for _ in range(k)]
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    rewards = jnp.asarray(reward_fn(samples.texts, columns).totals, jnp.float32)

    sequences = shd.shard_batch(samples.rollout.sequences(), mesh)  # tokens, input_mask, loss_mask
    advantages = grpo.group_token_advantages(rewards, sequences["loss_mask"], k, "grpo")
    score = jax.jit(
        functools.partial(ppo.score, models, with_policy=ppo.needs_rollout_logprobs(config, "grpo"))
    )
    with shd.activation_sharding(mesh, rules):
        scored = score(rl_state.params, ref_params, sequences)  # reference log-probs (and old)
    train_batch = ppo.PPOBatch.from_rollout(sequences, scored, {"advantages": advantages}, config)
    rl_state, rl_metrics = update(rl_state, train_batch)
    rl_metrics = jax.device_get(rl_metrics)
    print(
        f"GRPO: {len(samples.texts)} samples, reward mean {float(rewards.mean()):.3f},"
        f" ratio {float(rl_metrics['ratio_mean']):.3f} (1 before the update),"
        f" KL loss {float(rl_metrics['kl_loss']):.5f}"
    )
    print(f"a sample: {samples.texts[0]!r}; learning rate {float(rl_metrics['lr']):.0e}")
    return {"sft": jax.device_get(sft_metrics), "grpo": rl_metrics, "texts": samples.texts}


if __name__ == "__main__":
    main()

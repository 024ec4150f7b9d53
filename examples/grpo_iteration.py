"""GRPO from a saved run, from the public surface alone: sample, reward, advantages, update, save.

PYTHONPATH=. python examples/grpo_iteration.py runs/tiny_sft runs/tiny_grpo
"""

import sys

import jax
import jax.numpy as jnp

import rl_reason as rr
from rl_reason.data import synthetic


def main(start: str, workdir: str, num_prompts: int = 8, k: int = 4, updates: int = 3) -> dict:
    mesh, rules = rr.make_mesh((-1, 1, 1)), rr.DEFAULT_RULES
    run = rr.load_run(start, mesh, rules)  # config, params (the frozen reference), tokenizer
    examples = synthetic.generate("train", num_prompts, seed=1)
    prompts = [rr.format_prompt(ex["question"]) for ex in examples]
    models, config = rr.ActorCritic(rr.Transformer(run.config)), rr.grpo_ppo_config()
    tx, schedule = rr.make_optimizer(rr.OptimConfig(lr=1e-4, warmup_steps=0), updates)
    params = jax.tree.map(jnp.copy, run.params)  # the update donates the policy's buffers
    state = rr.create_ppo_state(models, tx, mesh, rules, seed=0, params=params)
    update = rr.jit_step(rr.make_ppo_update(models, tx, config, lr_schedule=schedule),
                         mesh, rules, rr.ppo_state_shardings(models, tx, mesh, rules))  # fmt: skip
    score = rr.make_score(models, config, mesh, rules, estimator="grpo")
    sampler = rr.Sampler(run.config, run.tokenizer, batch_size=num_prompts, prompt_buckets=(256,),
                         mesh=mesh, rules=rules)  # fmt: skip
    reward_fn = rr.compose({"correctness": 1.0})
    for i in range(updates):
        with rr.activation_sharding(mesh, rules):
            samples = sampler.generate(state.params, prompts, jax.random.PRNGKey(i),
                                       sampler.sampling_config(max_new_tokens=48, num_samples=k))  # fmt: skip
        rewards = jnp.asarray(reward_fn(samples.texts, rr.columns_k(examples, k)).totals)
        sequences = rr.shard_batch(samples.rollout.sequences(), mesh)
        advantages = rr.group_token_advantages(rewards, sequences["loss_mask"], k)
        scored = score(state.params, run.params, sequences)
        batch = rr.PPOBatch.from_rollout(sequences, scored, {"advantages": advantages}, config)
        state, metrics = update(state, batch)
        print(
            f"update {i + 1}: reward {float(rewards.mean()):.3f}, KL {float(metrics['kl_loss']):.5f}"
        )
    rr.save_run(workdir, state.params, run.config, run.tokenizer, step=updates)
    return {"metrics": jax.device_get(metrics), "params": jax.device_get(state.params)}


if __name__ == "__main__":
    main(*sys.argv[1:3])

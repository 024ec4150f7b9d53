"""PPO and the group-baseline methods (GRPO, RLOO, Dr. GRPO): one on-policy loop.

Each iteration: the next prompts from the resumable iterator -> K samples per
prompt from the current policy (the learner's params, same mesh) -> rewards
-> one scoring pass (policy and reference log-probs, values) -> advantages
(GAE with the KL penalty in the reward, as the study; or group baselines with
the KL as a loss term, as GRPO) -> `ppo_update` (epochs x minibatches in one
program) -> log -> held-out maj@1 / maj@K / pass@K every `rl.eval_every` ->
checkpoint.

The checkpoint step is the iteration. Everything an iteration draws comes
from (seed, iteration) or from the checkpointed state (policy and value
head, optimizer, the update's RNG, the prompt cursor, the KL coefficient), so
a run killed anywhere and restarted with the same command ends with the same
parameters and metrics. The reference model is rebuilt from its source and
checked against the checksum the run recorded.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from rl_reason import checkpointing
from rl_reason import logging as run_logging
from rl_reason.algorithms import advantages as adv_lib
from rl_reason.algorithms import grpo, kl, optimizer, ppo
from rl_reason.algorithms import train_state as ts
from rl_reason.data import templates
from rl_reason.data.iterator import IndexIterator
from rl_reason.experiments import rollout, runs, sources, tasks
from rl_reason.experiments.config import validate_rl
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose
from rl_reason.sampling.engine import Sampler

_log = logging.getLogger(__name__)

GROUP_ESTIMATORS = ("grpo", "grpo_no_std", "rloo", "dr_grpo")


def ppo_config(config: ml_collections.ConfigDict) -> ppo.PPOConfig:
    return ppo.PPOConfig(**config.ppo.to_dict())


def advantages_and_rewards(
    scored: dict[str, jax.Array],
    token_scores: jax.Array,
    sequence_rewards: jax.Array,
    loss_mask: jax.Array,
    kl_coef: jax.Array,
    *,
    estimator: str,
    num_samples: int,
    gamma: float,
    lam: float,
    kl_estimator: str,
    std_floor: float,
) -> dict[str, jax.Array]:
    """Advantages (and returns) for one rollout batch, with the KL diagnostics.

    "gae": the study's PPO; per-token rewards are the task rewards minus
    kl_coef * KL(policy || reference) on every completion token, then GAE.
    A group estimator: each completion's total reward against its K-1
    siblings, broadcast to its tokens (the KL, if any, is a loss term).
    """
    valid = loss_mask.at[:, 0].set(False)
    out: dict[str, jax.Array] = {}
    has_reference = "ref_logprobs" in scored
    if has_reference and "old_logprobs" in scored:  # else the single-step update logs them
        out.update(kl.all_kl_estimates(scored["old_logprobs"], scored["ref_logprobs"], valid))
    if estimator == "gae":
        rewards = token_scores
        if has_reference:
            rewards = kl.token_rewards_with_kl(
                token_scores,
                scored["old_logprobs"],
                scored["ref_logprobs"],
                valid,
                kl_coef,
                kl_estimator,
            )
        advantages, returns = adv_lib.gae(rewards, scored["old_values"], valid, gamma, lam)
        out.update(advantages=advantages, returns=returns)
        out["kl_penalty_mean"] = ((token_scores - rewards) * valid).sum() / jnp.maximum(
            valid.any(axis=1).sum(), 1
        )
    else:
        out["advantages"] = grpo.group_token_advantages(
            sequence_rewards, valid, num_samples, estimator, std_floor
        )
        out["zero_variance_groups"] = adv_lib.zero_variance_fraction(sequence_rewards, num_samples)
    return out


def load_critic(
    config: ml_collections.ConfigDict,
    start: sources.LoadedModel,
    mesh,
    rules,
    **changes: Any,
) -> sources.LoadedModel | None:
    """The separate critic `config.critic` names, with a value head; None for a value
    head on the policy's trunk. It reads the policy's token ids: same vocabulary."""
    kind = config.get("critic", {}).get("kind", "")
    if not kind:
        return None
    if kind == "start":
        loaded = start
    else:
        loaded = sources.load_model(kind, config.critic.path, mesh, rules)
        if loaded.config.vocab_size != start.config.vocab_size:
            raise sources.ModelSourceError(
                kind,
                config.critic.path,
                f"its vocabulary has {loaded.config.vocab_size} tokens, the policy's"
                f" {start.config.vocab_size}: the critic must read the policy's token ids.",
            )
    return sources.with_heads(loaded, (ppo.VALUE_HEAD,), mesh, rules, seed=config.seed, **changes)


def state_items(models: ppo.ActorCritic, state: Any) -> dict[str, Any]:
    """The checkpoint items of the PPO state: `policy.params` (what evaluation and
    `sources.load_run` read), a critic's as `critic.params`, the rest as `policy.train`."""
    if models.critic is None:
        return checkpointing.train_state_items("policy", state)
    return {
        "policy.params": state.params["policy"],
        "critic.params": state.params["critic"],
        "policy.train": state.replace(params=None),
    }


def merge_state_items(models: ppo.ActorCritic, items: dict[str, Any]) -> Any:
    """Inverse of `state_items`."""
    if models.critic is None:
        return checkpointing.merge_train_state("policy", items)
    params = {"policy": items["policy.params"], "critic": items["critic.params"]}
    return items["policy.train"].replace(params=params)


def orm_runtime(config: ml_collections.ConfigDict, mesh, rules) -> dict[str, Any]:
    """The scorer the ORM rewards (`orm_outcome`, `orm_steps`) call: the ORM run at
    rl.orm_source, batched like a rollout; nothing when the config names no ORM."""
    rl = config.rl
    if not rl.get("orm_source"):
        return {}
    scorer = sources.orm_scorer(
        rl.orm_source,
        mesh,
        rules,
        batch_size=rl.sampling_batch_size,
        length_buckets=tuple(rl.orm_length_buckets),
    )
    return {"scorer": scorer}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) PPO/GRPO to rl.num_iterations; returns the last logged metrics.

    Raises checkpointing.Preempted after saving when SIGTERM/SIGINT arrives.
    """
    mesh, rules = runs.start(config, workdir, validate_rl)
    rl, pc = config.rl, ppo_config(config)
    task = tasks.load(config)

    source = sources.load_model(config.model_source.kind, config.model_source.path, mesh, rules)
    tokenizer = source.tokenizer
    if tokenizer is None:
        raise sources.ModelSourceError(
            config.model_source.kind,
            config.model_source.path,
            "it has no tokenizer; RL needs one to read and score samples.",
        )
    remat = {"remat": rl.remat} if rl.get("remat") else {}  # changes what a step keeps, no value
    critic = load_critic(config, source, mesh, rules, **remat)
    heads = ("value",) if pc.use_value and critic is None else ()
    policy = sources.with_heads(source, heads, mesh, rules, seed=config.seed, **remat)
    models = ppo.ActorCritic(
        Transformer(policy.config), Transformer(critic.config) if critic else None
    )
    actor = lambda state: ppo.policy_params(models, state.params)  # what the sampler reads
    needs_reference = rl.kl_coef > 0 or pc.kl_loss_coef > 0
    ref_params = source.params if needs_reference else None  # frozen, sharded like the policy
    reference_id = sources.checksum(ref_params) if needs_reference else None
    del source

    steps_per_iteration = pc.num_epochs * pc.num_minibatches
    tx, schedule = optimizer.make_optimizer(config.optim, rl.num_iterations * steps_per_iteration)
    checkpointer = runs.make_checkpointer(config, workdir)
    iterator = IndexIterator(
        len(task.train), rl.prompts_per_iteration, seed=config.seed, shuffle=config.data.shuffle
    )
    progress: dict[str, Any] = {"iteration": 0, "kl_coef": float(rl.kl_coef), "samples_drawn": 0}
    if checkpointer.latest_step() is not None:
        abstract = ppo.abstract_ppo_state(models, tx, mesh, rules)
        items, progress, _ = checkpointer.restore(state_items(models, abstract))
        state = merge_state_items(models, items)
        iterator.restore(progress["data"])
        if progress.get("reference") != reference_id:
            raise runs.ResumeConfigError(
                f"The reference model rebuilt from {config.model_source.path!r} has checksum"
                f" {reference_id}, but the run started from {progress.get('reference')}: the"
                " source changed since the run began."
            )
    else:
        params = (
            policy.params if critic is None else {"policy": policy.params, "critic": critic.params}
        )
        state = ppo.create_ppo_state(models, tx, mesh, rules, config.seed, params=params)
    del policy, critic
    start = int(progress["iteration"])
    if start >= rl.num_iterations:  # a finished run is left as it is, config.json included
        checkpointer.close()
        print(f"The run in {workdir} finished at iteration {start}; nothing to do.")
        return runs.finished_record(workdir)
    runs.write_run_record(config, workdir, tokenizer)

    sampler = Sampler(
        models.policy.config,
        tokenizer,
        batch_size=rl.sampling_batch_size,
        prompt_buckets=tuple(rl.prompt_buckets),
        mesh=mesh,
        rules=rules,
        stop_strings=templates.STOP_SEQUENCES,
    )
    sampling = sampler.sampling_config(
        max_new_tokens=rl.max_new_tokens,
        temperature=rl.temperature,
        top_p=rl.top_p,
        num_samples=rl.num_samples,
    )
    reward_fn = compose.compose(rl.rewards.to_dict(), **orm_runtime(config, mesh, rules))
    update = ts.jit_step(
        ppo.make_ppo_update(models, tx, pc, lr_schedule=schedule),
        mesh,
        rules,
        ppo.ppo_state_shardings(models, tx, mesh, rules),
    )
    # GAE reads the rollout's log-probs (the KL in the reward); a single-step update does not.
    with_policy = rl.advantage == "gae" or not ppo.single_step(pc)
    score = jax.jit(
        functools.partial(ppo.score, models, chunk_size=pc.chunk_size, with_policy=with_policy)
    )
    estimate = jax.jit(
        functools.partial(
            advantages_and_rewards,
            estimator=rl.advantage,
            num_samples=rl.num_samples,
            gamma=rl.gamma,
            lam=rl.lam,
            kl_estimator=rl.kl_estimator,
            std_floor=rl.std_floor,
        )
    )
    writer = run_logging.MetricWriter(
        workdir, tensorboard=config.logging.tensorboard, resume_step=start or None
    )
    base_rng = jax.random.PRNGKey(config.seed)
    last: dict[str, Any] = {}
    bar = tqdm.trange(
        start,
        rl.num_iterations,
        initial=start,
        total=rl.num_iterations,
        desc=config.algorithm,
        disable=not config.logging.progress_bar or jax.process_index() != 0,
    )
    end = rl.num_iterations
    if rl.stop_after:
        end = min(end, start + rl.stop_after)
    try:
        if start == 0 and config.eval.at_start and rl.eval_every:
            # The start model: the x = 0 point of held-out maj@1 against samples drawn.
            # Not checkpointed: a kill before iteration 1 redoes it (the writer drops it).
            heldout = rollout.evaluate_heldout(
                sampler,
                actor(state),
                task.heldout,
                config.eval,
                jax.random.fold_in(base_rng, rl.num_iterations),  # a key no iteration uses
            )
            writer.write(0, {**{f"heldout/{k}": v for k, v in heldout.items()}, "samples_drawn": 0})
        with checkpointing.PreemptionGuard() as guard:
            for iteration in range(start, end):
                done = iteration + 1
                rng = jax.random.fold_in(base_rng, iteration)
                sample_rng, eval_rng = jax.random.split(rng)
                examples = [task.train[i] for i in next(iterator)]
                prompts = [templates.format_prompt(ex["question"]) for ex in examples]

                clock = time.perf_counter()
                with shd.activation_sharding(mesh, rules):
                    batch = rollout.collect(
                        sampler, actor(state), examples, prompts, sample_rng, sampling, reward_fn
                    )
                sample_seconds = time.perf_counter() - clock
                totals = batch.totals()
                if not np.all(np.isfinite(totals)):
                    raise runs.NonFiniteStepError(
                        f"Iteration {done}: a reward is not finite ({totals[~np.isfinite(totals)][:4]});"
                        " check the reward functions. Nothing from this iteration was saved."
                    )

                clock = time.perf_counter()
                sequences = shd.shard_batch(batch.sequences, mesh)
                token_scores, rewards = shd.shard_batch((batch.token_scores, totals), mesh)
                with shd.activation_sharding(mesh, rules):
                    scored = score(state.params, ref_params, sequences)
                    estimates = estimate(
                        scored,
                        token_scores,
                        rewards,
                        sequences["loss_mask"],
                        jnp.float32(progress["kl_coef"]),
                    )
                train_batch = {**sequences, **scored, "advantages": estimates["advantages"]}
                if "returns" in estimates:
                    train_batch["returns"] = estimates["returns"]
                if not pc.kl_loss_coef and "old_logprobs" in train_batch:
                    train_batch.pop("ref_logprobs", None)  # else the update logs the KL by it
                state, metrics = update(state, train_batch)
                metrics = jax.device_get(metrics)
                update_seconds = time.perf_counter() - clock
                # The scalars only: advantages and returns stay on the devices.
                diagnostics = shd.to_host(
                    {k: v for k, v in estimates.items() if k not in ("advantages", "returns")}
                )
                if metrics["finite"] != 1.0:
                    writer.write(done, {**metrics, **diagnostics})
                runs.check_finite(
                    metrics, f"{config.algorithm} iteration {done}", checkpointer.latest_step()
                )

                drawn = len(batch.texts)
                progress = {
                    **progress,
                    "iteration": done,
                    "samples_drawn": progress["samples_drawn"] + drawn,
                    "data": iterator.state(),
                    "reference": reference_id,
                    "models": {
                        name: model.config.to_dict()
                        for name, model in (("policy", models.policy), ("critic", models.critic))
                        if model is not None
                    },
                }
                if rl.kl_target and "kl_k1" in diagnostics:
                    progress["kl_coef"] = float(
                        kl.adaptive_kl_update(
                            progress["kl_coef"],
                            diagnostics["kl_k1"],
                            drawn,
                            rl.kl_target,
                            rl.kl_horizon,
                        )
                    )
                generated = int(batch.samples.rollout.lengths.sum())
                record = {
                    **metrics,
                    **diagnostics,
                    **batch.metrics(),
                    "kl_coef": progress["kl_coef"],
                    "samples_drawn": progress["samples_drawn"],
                    "sample_seconds": sample_seconds,
                    "update_seconds": update_seconds,
                    "sampling_tokens_per_second": generated / max(sample_seconds, 1e-9),
                    "update_tokens_per_second": float(metrics["target_tokens"])
                    * pc.num_epochs
                    / max(update_seconds, 1e-9),
                }
                if rl.eval_every and (done % rl.eval_every == 0 or done == rl.num_iterations):
                    record.update(
                        {
                            f"heldout/{k}": v
                            for k, v in rollout.evaluate_heldout(
                                sampler, actor(state), task.heldout, config.eval, eval_rng
                            ).items()
                        }
                    )
                last = writer.write(done, record)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
                stop = guard.should_stop(done)
                checkpointer.save(
                    done,
                    state_items(models, state),
                    progress,
                    force=done == end or stop,
                )
                if stop and done < end:  # at `end` the run is done: nothing to resume
                    raise checkpointing.Preempted(done, workdir)
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    return last

"""PPO and the group-baseline methods (GRPO, RLOO, Dr. GRPO, DAPO, GSPO, CISPO,
REINFORCE++): the on-policy learner.

One iteration (`OnPolicyLearner.iteration`, what the loop runs and the
benchmarks time): K samples per prompt from the current policy (the
learner's params, same mesh) -> rewards -> one scoring pass (policy and
reference log-probs, values) -> advantages (`advantages.rollout_advantages`:
GAE with the KL penalty in the reward, as the study; or a group baseline
with the KL as a loss term, as GRPO) -> `ppo_update` (epochs x minibatches
in one program; its policy term by name, `policy_losses`). DAPO's dynamic
sampling refills the rollout from the same iterator before scoring. The loop around it (`train`) draws the prompts from the
resumable iterator, logs, measures held-out maj@1 / maj@K / pass@K every
`rl.eval_every` and checkpoints.

The checkpoint step is the iteration. Everything an iteration draws comes
from (seed, iteration[, refill round]) or from the checkpointed state (policy and value
head, optimizer, the update's RNG, the prompt cursor, the KL coefficient), so
a run killed anywhere and restarted with the same command ends with the same
parameters and metrics. The reference model is rebuilt from its source and
checked against the checksum the run recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from rl_reason import checkpointing
from rl_reason.algorithms import advantages as adv_lib
from rl_reason.algorithms import dapo, kl, optimizer, ppo
from rl_reason.algorithms import rollout_correction as rc
from rl_reason.algorithms import train_state as ts
from rl_reason.algorithms.logprobs import SharedPrompts
from rl_reason.data import templates
from rl_reason.data.iterator import IndexIterator
from rl_reason.experiments import adapters, rollout, runs, sources, tasks
from rl_reason.experiments import config as config_lib
from rl_reason.experiments.config import validate_rl
from rl_reason.models import lora, precision
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose
from rl_reason.sampling.sampler import LENGTH


def ppo_config(config: ml_collections.ConfigDict) -> ppo.PPOConfig:
    return ppo.PPOConfig(**config.ppo.to_dict())


def estimator_settings(config: ml_collections.ConfigDict) -> adv_lib.EstimatorSettings:
    rl = config.rl
    return adv_lib.EstimatorSettings(
        rl.num_samples, rl.gamma, rl.lam, rl.kl_estimator, rl.std_floor
    )


@dataclasses.dataclass
class Iteration:
    """What one on-policy iteration produced, besides the new state."""

    batch: rollout.RolloutBatch
    metrics: dict[str, Any]  # the update's, on the host
    diagnostics: dict[str, Any]  # the advantages' scalars (KL estimates, penalties), on the host
    seconds: dict[str, float]  # generate, reference (scoring and advantages), update
    samples_drawn: int = 0  # every sample the rollout drew (dynamic sampling draws more)


class OnPolicyLearner:
    """An RL config's on-policy pieces: models, sampler, rewards and the jitted steps.

    `start` is the loaded start model: its params become the frozen
    reference (when a KL needs one), a copy (with a value head when PPO has
    one, and `train.remat` if set) the trained policy; `critic` a separate
    critic (`load_critic`) or None. `full_length=True` samples with no EOS
    and no stop strings, so that every row runs rl.max_new_tokens tokens
    (the benchmarks' budget-shaped work).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        start: sources.LoadedModel,
        mesh,
        rules,
        *,
        critic: sources.LoadedModel | None = None,
        reward_fn: compose.Composite | None = None,
        full_length: bool = False,
    ):
        config_lib.resolve_moved_keys(config)
        rl = config.rl
        self.config, self.mesh, self.rules = config, mesh, rules
        self.pc = pc = ppo_config(config)
        remat = {"remat": config.train.remat} if config.train.remat else {}  # what a step keeps
        heads = ("value",) if pc.use_value and critic is None else ()
        policy = sources.with_heads(start, heads, mesh, rules, seed=config.seed, **remat)
        # LoRA (`lora.rank` > 0): adapters on the frozen start, which is also the reference.
        self.lora = adapters.lora_config(config)
        self.models = ppo.ActorCritic(
            self._policy_model(policy.config), Transformer(critic.config) if critic else None
        )
        self.needs_reference = needs_reference = rl.kl_coef > 0 or pc.kl_loss_coef > 0
        # Frozen, sharded like the policy; under LoRA the state's own base (no second copy).
        self.ref_params = start.params if needs_reference and self.lora is None else None
        # Its fingerprints (today's, and the one runs begun before format 2 recorded): for
        # the reference, and for the base a LoRA run's adapters belong to.
        needs_ids = needs_reference or self.lora is not None
        self.base_ids = sources.fingerprints(start.params) if needs_ids else (None,)
        self.reference_ids = self.base_ids if needs_reference else (None,)
        self.reference_id = self.reference_ids[0]
        steps = rl.num_iterations * pc.num_epochs * pc.num_minibatches
        self.tx, schedule = optimizer.make_optimizer(config.optim, steps)
        if self.lora is None:
            self.start_params = (
                policy.params
                if critic is None
                else {"policy": policy.params, "critic": critic.params}
            )
        else:
            self.start_params = adapters.initial_params(
                config, self.models.policy, policy.params, jax.random.PRNGKey(config.seed)
            )
            self.tx = lora.lora_optimizer(self.tx)
        self.sampler = rollout.run_sampler(
            config,
            self.models.policy.config,
            start.tokenizer,
            mesh,
            rules,
            **({"stop_strings": ()} if full_length else {}),
        )
        self.correction = correction_mode(config, self.models.policy.config)
        self.sampling = self.sampler.sampling_config(
            max_new_tokens=rl.max_new_tokens,
            temperature=rl.temperature,
            top_p=rl.top_p,
            num_samples=rl.num_samples,
            **({"eos_ids": ()} if full_length else {}),
        )
        self.reward_fn = reward_fn or compose.compose(
            rl.rewards.to_dict(), **orm_runtime(config, mesh, rules)
        )
        self._jit_steps(schedule)

    def _jit_steps(self, schedule) -> None:
        """The iteration's compiled pieces: update, scoring, advantages, mismatch."""
        config, pc, rl, mesh, rules = self.config, self.pc, self.config.rl, self.mesh, self.rules
        shardings = ppo.ppo_state_shardings(self.models, self.tx, mesh, rules)
        # One program per SharedPrompts layout (None: whole rows), as scoring's.
        self._update_for = functools.cache(
            lambda shared: ts.jit_step(
                ppo.make_ppo_update(self.models, self.tx, pc, lr_schedule=schedule, shared=shared),
                mesh,
                rules,
                shardings,
            )
        )
        # The mismatch is measured against the learner's log-probs: they are computed.
        correcting = self.correction is not None
        with_policy = ppo.needs_rollout_logprobs(pc, rl.advantage, rl.kl_coef) or correcting
        self.score = ppo.make_score(self.models, pc, with_policy=with_policy)
        self.estimate = jax.jit(
            functools.partial(
                adv_lib.rollout_advantages, rl.advantage, settings=estimator_settings(config)
            )
        )
        if self.correction is not None:
            mode, cap = self.correction
            self.measure = jax.jit(
                lambda learner, sampler, sequences: rc.measure_and_correct(
                    mode, learner, sampler, ppo.valid_tokens(sequences), cap
                )
            )

    def _policy_model(self, config) -> Transformer | lora.LoraModel:
        if self.lora is None:
            return Transformer(config)
        self._merged = lora.Merger(self.lora)
        return lora.LoraModel(Transformer(config), self.lora)

    def initial_state(self):
        """The state at iteration 0. Under LoRA it takes the start's buffers as its frozen
        base (no copy; nothing else reads them): call it once."""
        return ppo.create_ppo_state(
            self.models,
            self.tx,
            self.mesh,
            self.rules,
            self.config.seed,
            params=self.start_params,
            donate=self.lora is not None,
        )

    def abstract_state(self):
        return ppo.abstract_ppo_state(self.models, self.tx, self.mesh, self.rules)

    def actor(self, state) -> Any:
        """What the sampler reads of the state: the policy's params (LoRA's merged)."""
        params = ppo.policy_params(self.models, state.params)
        return params if self.lora is None else self._merged(params)

    def reference(self, state) -> Any:
        """The frozen reference's params: the start model (under LoRA, the state's base)."""
        if self.lora is not None and self.needs_reference:
            return state.params["base"]
        return self.ref_params

    def state_items(self, state) -> dict[str, Any]:
        """The checkpoint items of `state` (`state_items`; under LoRA only the adapters
        and heads of the params, as "policy.lora": the base is rebuilt from its source)."""
        if self.lora is None:
            return state_items(self.models, state)
        return adapters.state_items(state)

    def merge_state_items(self, items: dict[str, Any]) -> Any:
        if self.lora is None:
            return merge_state_items(self.models, items)
        return adapters.merge_state_items(items, self.start_params["base"])

    def iteration(
        self,
        state: Any,
        examples: Sequence[Mapping[str, Any]],
        prompts: Sequence[str],
        rng: jax.Array,
        kl_coef: float,
        on_phase: Callable[[str], None] | None = None,
        refill: Callable[[], tuple[list, list[str]]] | None = None,
    ) -> tuple[Any, Iteration]:
        """One iteration on `prompts` (`examples` their rows, for the rewards): rollout,
        scoring, advantages, update. `refill()` gives more (examples, prompts) for
        dynamic sampling (`rollout`). `on_phase(name)` is called after each phase
        (the devices are waited for first, so that phases are timed apart)."""
        mesh, rules, seconds = self.mesh, self.rules, {}
        clock = time.perf_counter()

        def phase_done(name: str, *values: Any) -> None:
            nonlocal clock
            jax.block_until_ready(values)
            seconds[name] = time.perf_counter() - clock
            if on_phase:
                on_phase(name)
            clock = time.perf_counter()

        batch, drawn, sampling_stats = self.rollout(state, examples, prompts, rng, refill)
        totals, token_scores, keep, shaping_stats = self.shaped_rewards(batch)
        phase_done("generate")

        # Scoring and the update see the columns that hold tokens, not the sampler's padding.
        span = rollout.token_span(batch.sequences["input_mask"], self.config.rl.pad_to_multiple)
        sequences = shd.shard_batch({k: v[:, span] for k, v in batch.sequences.items()}, mesh)
        token_scores, rewards = shd.shard_batch((token_scores[:, span], totals), mesh)
        shared = self.shared_prompts(batch, span)
        with shd.activation_sharding(mesh, rules):
            scored = self.score(state.params, self.reference(state), sequences, shared=shared)
            estimates = self.estimate(
                scored, token_scores, rewards, sequences["loss_mask"], jnp.float32(kl_coef)
            )
        phase_done("reference", scored, estimates)

        correction, mismatch = None, {}
        if self.correction is not None:
            sampler_logprobs = batch.samples.rollout.sequence_logprobs()[:, span]
            sampler_logprobs = shd.shard_batch(sampler_logprobs, mesh)
            with shd.activation_sharding(mesh, rules):
                correction, mismatch = self.measure(
                    scored["old_logprobs"], sampler_logprobs, sequences
                )
        if keep is not None:  # overlong filtering: cut samples leave the loss, not the groups
            keep = shd.shard_batch(keep, mesh)
            sequences = {**sequences, "loss_mask": sequences["loss_mask"] & keep[:, None]}
        train_batch = ppo.PPOBatch.from_rollout(sequences, scored, estimates, self.pc, correction)
        # The scalars only: advantages and returns stay on the devices.
        diagnostics = shd.to_host(
            {
                k: v
                for k, v in {**estimates, **mismatch}.items()
                if k not in ("advantages", "returns")
            }
        )
        diagnostics.update(sampling_stats, **shaping_stats)
        del scored, estimates
        state, metrics = self.update(state, train_batch, shared)
        metrics = jax.device_get(metrics)
        phase_done("update")
        return state, Iteration(batch, metrics, diagnostics, seconds, drawn)

    def update(self, state, batch, shared: SharedPrompts | None = None):
        """The PPO update (`ppo.ppo_update`) on the learner's batch, jitted on the mesh;
        `shared`: the batch's shared prompt columns, run once a prompt."""
        return self._update_for(shared)(state, batch)

    def shared_prompts(self, batch: rollout.RolloutBatch, span: slice) -> SharedPrompts | None:
        """The columns of the learner's batch (the rollout's `span`) that the K samples
        of each prompt share, for scoring and the update to run once a prompt
        (`SharedPrompts`), or None (K = 1, rl.shared_prompts off, or rows that do not
        share them). Rounded down to a multiple of rl.pad_to_multiple: one program per
        (width, columns)."""
        if not self.config.rl.shared_prompts:
            return None
        return SharedPrompts.find(
            batch.sequences["tokens"][:, span],
            batch.sequences["input_mask"][:, span],
            self.sampling.num_samples,
            batch.samples.rollout.prompt_tokens.shape[1] - span.start,
            self.config.rl.pad_to_multiple,
        )

    def rollout(self, state, examples, prompts, rng, refill=None):
        """(the iteration's batch, samples drawn, dynamic sampling's figures).

        With rl.dynamic_sampling (DAPO), groups whose rewards are all equal leave
        the batch and `refill()`'s prompts are sampled (key fold_in(rng, round)) until
        it holds len(prompts) informative groups or rl.max_refill_rounds more rounds
        were drawn; then the earliest uninformative groups fill it (`dapo`).
        """
        rl, k = self.config.rl, self.sampling.num_samples
        params = self.actor(state)  # once for every round (LoRA merges here)
        draws = [self._collect(params, examples, prompts, rng)]
        if not rl.get("dynamic_sampling"):
            return draws[0], len(draws[0].texts), {}
        wanted = len(prompts)
        informative = dapo.informative_groups(draws[0].totals(), k)
        while informative.sum() < wanted and len(draws) <= rl.max_refill_rounds and refill:
            more_examples, more_prompts = refill()
            key = jax.random.fold_in(rng, len(draws))
            draws.append(self._collect(params, more_examples, more_prompts, key))
            informative = np.concatenate(
                [informative, dapo.informative_groups(draws[-1].totals(), k)]
            )
        chosen = dapo.full_batch_groups(informative, wanted)
        drawn = sum(len(d.texts) for d in draws)
        stats = {
            "dynamic_sampling/rounds": len(draws),
            "dynamic_sampling/extra_samples": drawn - len(draws[0].texts),
            "dynamic_sampling/zero_variance_drawn": float(1.0 - informative.mean()),
            "dynamic_sampling/filled_uninformative": int(wanted - informative[chosen].sum()),
        }
        return rollout.concatenate(draws).take_groups(chosen), drawn, stats

    def _collect(self, params, examples, prompts, rng) -> rollout.RolloutBatch:
        with shd.activation_sharding(self.mesh, self.rules):
            batch = rollout.collect(
                self.sampler,
                params,
                examples,
                prompts,
                rng,
                self.sampling,
                self.reward_fn,
            )
        totals = batch.totals()
        if not np.all(np.isfinite(totals)):
            raise runs.NonFiniteStepError(
                f"A reward is not finite ({totals[~np.isfinite(totals)][:4]}); check the"
                " reward functions. Nothing from this iteration was saved."
            )
        return batch

    def shaped_rewards(self, batch: rollout.RolloutBatch):
        """(totals [N], token scores [N, L], rows kept in the loss or None, figures): the
        batch's rewards with DAPO's overlong shaping (rl.overlong_buffer > 0: a penalty on
        each completion's last token) and filtering (rl.overlong_filter)."""
        rl, sampled = self.config.rl, batch.samples.rollout
        totals, token_scores, keep, stats = batch.totals(), batch.token_scores, None, {}
        if rl.get("overlong_buffer"):
            lengths = np.asarray(sampled.lengths)
            penalty = dapo.overlong_penalty(
                lengths, rl.max_new_tokens, rl.overlong_buffer, rl.overlong_penalty
            )
            last = sampled.prompt_tokens.shape[1] + np.maximum(lengths - 1, 0)
            token_scores = token_scores.copy()
            token_scores[np.arange(len(last)), last] += penalty
            totals = totals + penalty
            stats["overlong/penalty_mean"] = float(penalty.mean())
            stats["overlong/penalized_fraction"] = float(np.mean(penalty < 0))
        if rl.get("overlong_filter"):
            keep = np.asarray(sampled.finish_reason) != LENGTH
            stats["overlong/filtered_fraction"] = float(1.0 - keep.mean())
        return totals, token_scores, keep, stats


def correction_mode(config, model_config) -> tuple[str, float | None] | None:
    """(mode, cap) of the sampler/learner mismatch correction the config asks for, or
    None when the two sides compute alike in float32 (nothing to measure: the update is
    exactly today's). "auto" is token_tis when either side computes in less."""
    rc_config = config.get("rollout_correction", {"mode": "auto", "cap": 0.0})
    lower = precision.sampler_or_learner_below_float32(model_config, config.sampling.get("dtype"))
    mode = rc_config["mode"]
    if mode == "auto":
        mode = rc.DEFAULT_MODE if lower else "none"
    if mode == "none" and not lower:
        return None
    return mode, rc_config["cap"] or None


def load_critic(
    config: ml_collections.ConfigDict,
    start: sources.LoadedModel,
    mesh,
    rules,
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
    remat = {"remat": config.train.remat} if config.train.remat else {}
    return sources.with_heads(loaded, (ppo.VALUE_HEAD,), mesh, rules, seed=config.seed, **remat)


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
        batch_size=config.sampling.batch_size,
        length_buckets=tuple(rl.orm_length_buckets),
    )
    return {"scorer": scorer}


def load_learner(config: ml_collections.ConfigDict, mesh, rules, **options) -> OnPolicyLearner:
    """The learner of an RL config, from its `model_source` (and `critic`)."""
    source = sources.load_model(config.model_source.kind, config.model_source.path, mesh, rules)
    if source.tokenizer is None:
        raise sources.ModelSourceError(
            config.model_source.kind,
            config.model_source.path,
            "it has no tokenizer; RL needs one to read and score samples.",
        )
    critic = load_critic(config, source, mesh, rules)
    return OnPolicyLearner(config, source, mesh, rules, critic=critic, **options)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) PPO/GRPO to rl.num_iterations; returns the last logged metrics.

    Raises checkpointing.Preempted after saving when SIGTERM/SIGINT arrives.
    """
    rl = config.rl
    with runs.Run(config, workdir, validate_rl) as run:
        task = tasks.load(config)
        learner = load_learner(config, run.mesh, run.rules)
        iterator = IndexIterator(
            len(task.train), rl.prompts_per_iteration, seed=config.seed, shuffle=config.data.shuffle
        )
        progress: dict[str, Any] = {
            "iteration": 0,
            "kl_coef": float(rl.kl_coef),
            "samples_drawn": 0,
        }
        restored = run.restore(learner.state_items(learner.abstract_state()))
        if restored is not None:
            items, progress = restored
            adapters.check_base(config, progress, learner.base_ids)
            _check_reference(config, progress, learner.reference_ids)
            state = learner.merge_state_items(items)
            iterator.restore(progress["data"])
        else:
            state = learner.initial_state()
        learner.start_params = None  # the state holds them now
        start = int(progress["iteration"])
        if start >= rl.num_iterations:
            return run.finished(f"finished at iteration {start}")
        run.begin(learner.sampler.tokenizer, start)
        end = (
            rl.num_iterations
            if not rl.stop_after
            else min(rl.num_iterations, start + rl.stop_after)
        )
        base_rng = jax.random.PRNGKey(config.seed)
        last: dict[str, Any] = {}

        def draw() -> tuple[list, list[str]]:
            """The next prompts of the resumable iterator, and their rows."""
            examples = [task.train[i] for i in next(iterator)]
            return examples, [templates.format_prompt(ex["question"]) for ex in examples]

        if start == 0 and config.eval.at_start and rl.eval_every:
            # The start model: the x = 0 point of held-out maj@1 against samples drawn.
            # Not checkpointed: a kill before iteration 1 redoes it (the writer drops it).
            key = jax.random.fold_in(base_rng, rl.num_iterations)  # a key no iteration uses
            heldout = rollout.evaluate_heldout(
                learner.sampler, learner.actor(state), task.heldout, config.eval, key
            )
            run.log(0, {**{f"heldout/{k}": v for k, v in heldout.items()}, "samples_drawn": 0})
        for iteration in tqdm.trange(
            start,
            end,
            initial=start,
            total=rl.num_iterations,
            desc=config.algorithm,
            disable=not run.show_progress,
        ):
            done = iteration + 1
            sample_rng, eval_rng = jax.random.split(jax.random.fold_in(base_rng, iteration))
            state, out = learner.iteration(
                state, *draw(), sample_rng, progress["kl_coef"], refill=draw
            )
            if out.metrics["finite"] != 1.0:
                run.log(done, {**out.metrics, **out.diagnostics})
            run.check_finite(out.metrics, f"{config.algorithm} iteration {done}")
            progress = _next_progress(config, learner, progress, out, done, iterator.state())
            record = _iteration_record(learner, progress, out)
            if rl.eval_every and (done % rl.eval_every == 0 or done == rl.num_iterations):
                heldout = rollout.evaluate_heldout(
                    learner.sampler, learner.actor(state), task.heldout, config.eval, eval_rng
                )
                record.update({f"heldout/{k}": v for k, v in heldout.items()})
            last = run.log(done, record)
            items = learner.state_items(state)
            run.checkpoint(done, items, progress, force=done == end, finished=done == end)
        return last


def _check_reference(config, progress: Mapping[str, Any], reference_ids: tuple) -> None:
    if progress.get("reference") not in reference_ids:
        reference_id = reference_ids[0]
        raise runs.ResumeConfigError(
            f"The reference model rebuilt from {config.model_source.path!r} has checksum"
            f" {reference_id}, but the run started from {progress.get('reference')}: the"
            " source changed since the run began."
        )


def _next_progress(config, learner: OnPolicyLearner, progress, out: Iteration, done: int, data):
    """The progress after iteration `done`: what a resume continues from."""
    rl, drawn = config.rl, len(out.batch.texts)
    models = learner.models
    progress = {
        **progress,
        "iteration": done,
        "samples_drawn": progress["samples_drawn"] + (out.samples_drawn or drawn),
        "data": data,
        "reference": learner.reference_id,
        "models": {
            name: model.config.to_dict()
            for name, model in (("policy", models.policy), ("critic", models.critic))
            if model is not None
        },
    }
    if learner.lora is not None:  # what `sources.load_run` rebuilds the policy from
        progress["lora"] = adapters.record(config, learner.lora, learner.base_ids[0])
    if rl.kl_target and "kl_k1" in out.diagnostics:  # the adaptive KL controller
        progress["kl_coef"] = float(
            kl.adaptive_kl_update(
                progress["kl_coef"], out.diagnostics["kl_k1"], drawn, rl.kl_target, rl.kl_horizon
            )
        )
    return progress


def _iteration_record(learner: OnPolicyLearner, progress, out: Iteration) -> dict[str, Any]:
    """What an iteration logs: the update's metrics, the rollout's, throughput."""
    sample_seconds = out.seconds["generate"]
    update_seconds = out.seconds["reference"] + out.seconds["update"]
    generated = int(out.batch.samples.rollout.lengths.sum())
    return {
        **out.metrics,
        **out.diagnostics,
        **out.batch.metrics(),
        "kl_coef": progress["kl_coef"],
        "samples_drawn": progress["samples_drawn"],
        "sample_seconds": sample_seconds,
        "update_seconds": update_seconds,
        "sampling_tokens_per_second": generated / max(sample_seconds, 1e-9),
        "update_tokens_per_second": float(out.metrics["target_tokens"])
        * learner.pc.num_epochs
        / max(update_seconds, 1e-9),
    }

"""PPO on token sequences: score the rollout once, then one program of epochs x minibatches.

The loop calls, per iteration:

  scored = score(models, params, ref_params, seqs)         # old log-probs, values, ref log-probs
  rewards = kl.token_rewards_with_kl(scores, old, ref, ...)
  advantages, returns = advantages.gae(rewards, old_values, mask, gamma, lam)
  state, metrics = ppo_update(state, {**seqs, **scored, advantages, returns})

`ppo_update` is one pure function (purejaxrl's shape): an outer `lax.scan`
over epochs, each shuffling the rows with the state's RNG, an inner
`lax.scan` over minibatches, each one optimizer step accumulated over
micro-batches. GRPO, RLOO and Dr. GRPO are the same update with group
advantages and no value (see grpo.py).

Alignment, as everywhere in rl_reason: entry t of a per-token array is about
token t. The value head at position t is the value of the state after token
t, so the value of the state in which token t was chosen is heads[:, t - 1]:
values are shifted right by one, like log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rl_reason.algorithms import sft
from rl_reason.algorithms import train_state as ts
from rl_reason.algorithms.advantages import KL_IN_REWARD, masked_mean, masked_variance, whiten
from rl_reason.algorithms.kl import KL_ESTIMATORS, kl_estimate
from rl_reason.algorithms.logprobs import (
    SharedPrompts,
    TokenLogProbs,
    pad_columns,
    run_model,
    score_tokens,
    token_logprobs,
)
from rl_reason.algorithms.microbatch import accumulate_gradients, split_microbatches
from rl_reason.algorithms.policy_losses import POLICY_LOSSES, token_log_ratio
from rl_reason.algorithms.policy_losses import clipped_policy_loss  # noqa: F401 (its old home)
from rl_reason.algorithms.train_state import TrainState
from rl_reason.models.transformer import Transformer, init_params
from rl_reason.parallel import sharding as shd

Batch = dict[str, jax.Array]

VALUE_HEAD = "value"
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Settings of the PPO loss and update.

    loss_aggregation says how per-token policy, entropy and KL terms become
    one number: "token_mean" (every token of the minibatch weighs the same;
    trlx, the study), "seq_mean_token_mean" (mean over tokens within a
    sequence, then over sequences; GRPO), "seq_mean_token_sum_norm" (token
    sum divided by the constant aggregation_length, then mean over
    sequences; Dr. GRPO, which removes the bias towards long wrong answers).
    aggregation_length = 0 uses the batch's sequence length L; set it to the
    generation budget to match Dr. GRPO exactly (it only rescales the loss).
    The value loss is always a token mean: it regresses each state's value.
    "token_mean" is also DAPO's token-level policy-gradient loss.

    policy_loss names the policy term (policy_losses.POLICY_LOSSES): "ppo"
    (the clipped token ratio), "gspo" / "gspo_token" (the sequence ratio),
    "cispo" (the clipped ratio as a stop-gradient weight). Its clip band is
    [1 - clip_eps, 1 + clip_eps_high]; clip_eps_high = 0 means clip_eps
    (symmetric), DAPO's clip-higher sets it above (0.28 against 0.2).
    """

    clip_eps: float = 0.2
    clip_eps_high: float = 0.0  # the upper clip; 0 = clip_eps
    policy_loss: str = "ppo"
    value_clip: float = 0.2  # 0 = no value clipping
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    kl_loss_coef: float = 0.0  # KL to the reference as a loss term (GRPO); 0 = off
    kl_estimator: str = "k3"  # the KL loss's estimator
    num_epochs: int = 1  # the study (trlx) uses 4
    num_minibatches: int = 1
    num_microbatches: int = 1
    whiten_advantages: bool = True
    loss_aggregation: str = "token_mean"
    aggregation_length: int = 0
    chunk_size: int = 256
    use_value: bool = True

    def __post_init__(self):
        problems = []
        if not self.clip_eps > 0:
            problems.append(f"clip_eps={self.clip_eps} must be > 0")
        for name in (
            "clip_eps_high",
            "value_clip",
            "vf_coef",
            "entropy_coef",
            "kl_loss_coef",
            "aggregation_length",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("num_epochs", "num_minibatches", "num_microbatches", "chunk_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.kl_estimator not in KL_ESTIMATORS:
            problems.append(f"kl_estimator={self.kl_estimator!r} not in {KL_ESTIMATORS}")
        if self.policy_loss not in POLICY_LOSSES:
            problems.append(f"policy_loss={self.policy_loss!r} not in {sorted(POLICY_LOSSES)}")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            problems.append(
                f"loss_aggregation={self.loss_aggregation!r} not in {LOSS_AGGREGATIONS}"
            )
        if not self.use_value and self.vf_coef:
            problems.append(f"use_value=False trains no value, so vf_coef={self.vf_coef} must be 0")
        if problems:
            raise ValueError("Invalid PPOConfig: " + "; ".join(problems))

    @property
    def clip_range(self) -> tuple[float, float]:
        """(low, high): the ratio's clip band is [1 - low, 1 + high]."""
        return self.clip_eps, self.clip_eps_high or self.clip_eps


@dataclasses.dataclass(frozen=True)
class ActorCritic:
    """The trained model(s).

    Without a critic, the value is the policy's own scalar head "value"
    (ModelConfig.heads=("value",)) and params is that one model's tree. With
    a critic, params is {"policy": ..., "critic": ...} and one optimizer
    updates both: one TrainState, one checkpoint item.
    """

    policy: Transformer
    critic: Optional[Transformer] = None

    def __post_init__(self):
        if self.critic is not None and VALUE_HEAD not in self.critic.config.heads:
            raise ValueError(
                f"The critic needs a {VALUE_HEAD!r} head: build it with"
                f" ModelConfig(heads=({VALUE_HEAD!r},)); it has heads={self.critic.config.heads}."
            )

    @property
    def has_value(self) -> bool:
        return self.critic is not None or VALUE_HEAD in self.policy.config.heads

    @property
    def reference(self) -> Transformer:
        """The policy's architecture without scalar heads, for the frozen reference.

        Flax ignores parameters a module does not use, so reference params may
        or may not carry the value head (an SFT checkpoint does not).
        """
        return Transformer(self.policy.config.replace(heads=()))


def policy_params(models: ActorCritic, params: Any) -> Any:
    """The policy's own params tree (the whole tree when there is no critic)."""
    return params if models.critic is None else params["policy"]


def _shift_right(x: jax.Array) -> jax.Array:
    """Entry t takes x[:, t - 1]; entry 0 is 0."""
    return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def _require_value(models: ActorCritic) -> None:
    if not models.has_value:
        raise ValueError(
            f"No value to compute: give the policy a {VALUE_HEAD!r} head"
            f" (ModelConfig.heads=({VALUE_HEAD!r},)) or an ActorCritic critic,"
            " or set PPOConfig.use_value=False (GRPO/RLOO)."
        )


def values(
    models: ActorCritic,
    params: Any,
    tokens: jax.Array,
    input_mask: jax.Array,
    shared: Optional[SharedPrompts] = None,
    prompt_ids: Optional[jax.Array] = None,
) -> jax.Array:
    """[N, L] float32: entry t is the value of the state in which token t was chosen.

    One trunk forward of the model that carries the value head (no logits).
    """
    _require_value(models)
    if models.critic is None:
        model, model_params = models.policy, params
    else:
        model, model_params = models.critic, params["critic"]
    out, first = run_model(model, model_params, tokens, input_mask, shared, prompt_ids)
    return _shift_right(pad_columns(out.heads[VALUE_HEAD], first))


def _policy_forward(
    models: ActorCritic,
    params: Any,
    batch: Batch,
    chunk_size: int,
    with_entropy: bool,
    with_values: bool,
    shared: Optional[SharedPrompts] = None,
) -> tuple[TokenLogProbs, Optional[jax.Array]]:
    """Policy log-probs (and entropies), and values, sharing the trunk when they can
    (and the prompts, with `shared`: rows in any order name theirs in batch["prompt_ids"])."""
    prompt_ids = batch.get("prompt_ids")
    scored = score_tokens(
        models.policy,
        policy_params(models, params),
        batch["tokens"],
        batch["input_mask"],
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        needed=_valid(batch),  # the completions: prompt-only chunks are not unembedded
        shared=shared,
        prompt_ids=prompt_ids,
    )
    if not with_values:
        return scored, None
    _require_value(models)
    if models.critic is None:
        return scored, _shift_right(scored.heads[VALUE_HEAD])
    return scored, values(models, params, batch["tokens"], batch["input_mask"], shared, prompt_ids)


def valid_tokens(batch: Batch) -> jax.Array:
    """[N, L] bool: the tokens the loss counts (completion tokens with a context)."""
    return _valid(batch)


def _valid(batch: Batch) -> jax.Array:
    """[N, L] bool: completion tokens with a context (sft.target_weights' tokens)."""
    masks = {k: jnp.asarray(batch[k]) for k in ("loss_mask", "input_mask")}
    return sft.target_weights(masks) > 0


def score(
    models: ActorCritic,
    params: Any,
    ref_params: Optional[Any],
    batch: Batch,
    chunk_size: int = 256,
    with_policy: bool = True,
    shared: Optional[SharedPrompts] = None,
) -> dict[str, jax.Array]:
    """The rollout as the policy sees it before any update; the one place the reference enters.

    Returns {"old_logprobs", "old_values", "ref_logprobs"} [N, L] float32, 0
    off the loss mask; "ref_logprobs" only when ref_params is given and
    "old_values" zeros when the models have no value. The loop stores them in
    the batch under these names. The PPO ratio is taken against these
    log-probs, recomputed by the same forward the loss uses, not against the
    sampler's: the sampler's numerics (KV cache, bf16, another kernel) differ
    slightly, and a ratio != 1 before the first step would clip and bias the
    update from the start (verl's and NeMo-RL's mismatched-log-prob issues).

    with_policy=False leaves "old_logprobs" out (values, if any, take a trunk
    forward without the unembedding): for a single-step update
    (`single_step(config)`), which takes its ratio against its own log-probs,
    exactly 1, and logs the KL to the reference itself (tunix's GRPO with
    num_iterations=1 skips this forward too).

    `shared` (logprobs.SharedPrompts: the K rows of each prompt hold it in their
    first columns) runs those columns once a prompt in every forward here: the
    same scores to rounding, for a prompt's work instead of K of it.
    """
    valid = _valid(batch)
    out = {}
    if with_policy:
        scored, vals = _policy_forward(
            models,
            params,
            batch,
            chunk_size,
            with_entropy=False,
            with_values=models.has_value,
            shared=shared,
        )
        out["old_logprobs"] = jnp.where(valid, scored.logprobs, 0.0)
    else:
        vals = (
            values(models, params, batch["tokens"], batch["input_mask"], shared)
            if models.has_value
            else None
        )
    out["old_values"] = jnp.where(valid, vals, 0.0) if vals is not None else jnp.zeros(valid.shape)
    if ref_params is not None:
        ref = token_logprobs(
            models.reference,
            ref_params,
            batch["tokens"],
            batch["input_mask"],
            chunk_size=chunk_size,
            needed=valid,
            shared=shared,
        )
        out["ref_logprobs"] = jnp.where(valid, ref.logprobs, 0.0)
    return jax.lax.stop_gradient(out)


def make_score(
    models: ActorCritic,
    config: PPOConfig,
    mesh: Optional[Mesh] = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    estimator: str = "grpo",
    kl_coef: float = 0.0,
    with_policy: Optional[bool] = None,
):
    """`score(params, ref_params, batch)` jitted, with the update's chunk size and the
    single-step rule chosen from `config` and the estimator (`needs_rollout_logprobs`;
    `with_policy` overrides it), and run under `mesh`'s activation sharding when given.
    What research code calls, and the on-policy learner builds its scoring from."""
    if with_policy is None:
        with_policy = needs_rollout_logprobs(config, estimator, kl_coef)
    scored = jax.jit(
        functools.partial(score, models, chunk_size=config.chunk_size, with_policy=with_policy),
        static_argnames="shared",
    )
    if mesh is None:
        return scored

    def score_on_mesh(params, ref_params, batch, shared=None):
        with shd.activation_sharding(mesh, rules):
            return scored(params, ref_params, batch, shared=shared)

    return score_on_mesh


# --- the loss ---------------------------------------------------------------


def clipped_value_loss(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, value_clip: float
) -> tuple[jax.Array, jax.Array]:
    """Per-token 0.5 max((V - R)^2, (clip(V, Vold - c, Vold + c) - R)^2), and where the latter wins.

    The pessimistic max keeps one update from moving the value further than
    c from the rollout's value when that would lower the loss (PPO2/trlx).
    value_clip = 0: plain 0.5 (V - R)^2.
    """
    unclipped = jnp.square(values - returns)
    if not value_clip:
        return 0.5 * unclipped, jnp.zeros(values.shape, bool)
    # Inside the band clip returns V itself, bit for bit, so "the clipped term
    # wins" is never decided by rounding.
    clipped_values = jnp.clip(values, old_values - value_clip, old_values + value_clip)
    clipped = jnp.square(clipped_values - returns)
    return 0.5 * jnp.maximum(unclipped, clipped), clipped > unclipped


def loss_normalizers(minibatch: Batch) -> dict[str, jax.Array]:
    """The FULL minibatch's counts: valid tokens and sequences with any valid token.

    Every micro-batch divides its sums by these, so accumulating micro-batch
    gradients gives exactly the full minibatch's gradient (as sft_loss).
    """
    valid = _valid(minibatch)
    return {
        "tokens": jnp.maximum(valid.sum(), 1).astype(jnp.float32),
        "sequences": jnp.maximum(valid.any(axis=1).sum(), 1).astype(jnp.float32),
    }


def aggregation_weights(
    valid: jax.Array, normalizers: dict[str, jax.Array], config: PPOConfig
) -> jax.Array:
    """[N, L] weights w with loss = sum w * per_token_loss, for config.loss_aggregation.

    Row-local factors (a sequence's token count) come from the row itself and
    global ones from `normalizers`, so micro-batch sums add up exactly.
    """
    weights = valid.astype(jnp.float32)
    if config.loss_aggregation == "token_mean":
        return weights / normalizers["tokens"]
    if config.loss_aggregation == "seq_mean_token_mean":
        row_tokens = jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
        return weights / row_tokens / normalizers["sequences"]
    length = config.aggregation_length or weights.shape[1]
    return weights / (length * normalizers["sequences"])


def ppo_loss(
    params: Any,
    minibatch: Batch,
    models: ActorCritic,
    config: PPOConfig,
    normalizers: dict[str, jax.Array],
    shared: Optional[SharedPrompts] = None,
) -> tuple[jax.Array, dict[str, dict[str, jax.Array]]]:
    """The PPO loss of (part of) a minibatch, normalised by the full minibatch's counts.

    loss = policy + vf_coef * value - entropy_coef * entropy + kl_loss_coef * KL(policy || ref).
    aux = {"mean": ...} holds this part's share of each metric (they add up
    over micro-batches to the minibatch's value); {"max": ...} holds maxima.
    `shared` (SharedPrompts with `prompts`): each prompt of the rows runs once.
    """
    valid = _valid(minibatch)
    forward = functools.partial(_policy_forward, models, params, minibatch, config.chunk_size)
    scored, vals = forward(with_entropy=True, with_values=config.use_value, shared=shared)
    token_share = valid.astype(jnp.float32) / normalizers["tokens"]
    aggregated = aggregation_weights(valid, normalizers, config)
    token_mean = lambda x: (x * token_share).sum()
    aggregate = lambda x: (x * aggregated).sum()

    old_logprobs = minibatch.get("old_logprobs")
    own_logprobs = old_logprobs is None  # a single-step update: the policy is the rollout's
    logprobs = scored.logprobs
    if own_logprobs:  # one buffer on both sides (XLA may otherwise compute it twice): ratio 1
        logprobs = jax.lax.optimization_barrier(logprobs)
        old_logprobs = jax.lax.stop_gradient(jnp.where(valid, logprobs, 0.0))
    log_ratio = token_log_ratio(logprobs, old_logprobs, valid)
    per_token_policy, policy_clipped, ratio = POLICY_LOSSES[config.policy_loss](
        logprobs,
        old_logprobs,
        minibatch["advantages"].astype(jnp.float32),
        valid,
        *config.clip_range,
    )
    if "is_weights" in minibatch:  # the sampler/learner mismatch correction
        per_token_policy = per_token_policy * minibatch["is_weights"]
    policy_loss = aggregate(per_token_policy)
    entropy = jnp.where(valid, scored.entropy, 0.0)
    loss = policy_loss
    if config.entropy_coef:  # at 0 the entropy is a metric only: no backward pass through it
        loss = loss - config.entropy_coef * aggregate(entropy)
    metrics = {
        "policy_loss": policy_loss,
        "entropy": token_mean(entropy),
        "clip_fraction": token_mean(policy_clipped),
        # KL(old || new) on samples from the old policy, k3 as verl/TRL log it.
        "approx_kl": token_mean(jnp.where(valid, kl_estimate(old_logprobs, scored.logprobs), 0.0)),
        "ratio_mean": token_mean(ratio),
    }
    if config.use_value:
        per_token_value, value_clipped = clipped_value_loss(
            vals, minibatch["old_values"], minibatch["returns"], config.value_clip
        )
        value_loss = token_mean(jnp.where(valid, per_token_value, 0.0))
        loss = loss + config.vf_coef * value_loss
        metrics.update(value_loss=value_loss, value_clip_fraction=token_mean(value_clipped))
    if own_logprobs and "ref_logprobs" in minibatch:  # the rollout's KL, as the loop logs it
        for name in KL_ESTIMATORS:
            estimate = kl_estimate(old_logprobs, minibatch["ref_logprobs"], name)
            metrics[f"kl_{name}"] = token_mean(jnp.where(valid, estimate, 0.0))
    if config.kl_loss_coef:
        per_token_kl = kl_estimate(scored.logprobs, minibatch["ref_logprobs"], config.kl_estimator)
        kl_loss = aggregate(jnp.where(valid, per_token_kl, 0.0))
        loss = loss + config.kl_loss_coef * kl_loss
        metrics["kl_loss"] = kl_loss
    metrics["loss"] = loss
    maxima = {
        "ratio_max": jnp.where(valid, ratio, -jnp.inf).max(),
        # How far the policy moved on its most-moved token, either way.
        "log_ratio_abs_max": jnp.abs(log_ratio).max(),
    }
    return loss, {"mean": metrics, "max": maxima}


# --- the update ---------------------------------------------------------------


def single_step(config: PPOConfig) -> bool:
    """One optimizer step per rollout: the update can take its ratio against its own
    log-probs (exactly 1), so the rollout's need not be computed before it."""
    return config.num_epochs * config.num_minibatches == 1


def needs_rollout_logprobs(config: PPOConfig, estimator: str, kl_coef: float = 1.0) -> bool:
    """Whether `score` must compute the rollout's log-probs before the update
    (`with_policy`): GAE pays the KL in the reward from them (REINFORCE++ too, when
    its reward's kl_coef is not 0), and a multi-step update takes its ratio against
    them. A single-step update otherwise takes its ratio against its own forward
    (exactly 1) and logs the KL itself."""
    pays_kl = estimator == "gae" or (estimator in KL_IN_REWARD and kl_coef != 0)
    return pays_kl or not single_step(config)


@chex.dataclass(frozen=True)
class PPOBatch:
    """One rollout batch as `ppo_update` reads it: [N, L] arrays aligned with `tokens`.

    `old_logprobs` (absent for a single-step update), `old_values` and `ref_logprobs`
    are `score`'s; `advantages` (and GAE's `returns`) `advantages.rollout_advantages`'.
    """

    tokens: jax.Array
    input_mask: jax.Array
    loss_mask: jax.Array
    advantages: jax.Array
    old_logprobs: Optional[jax.Array] = None
    old_values: Optional[jax.Array] = None
    returns: Optional[jax.Array] = None
    ref_logprobs: Optional[jax.Array] = None
    # The sampler/learner mismatch correction's token weights (`rollout_correction`),
    # multiplying the policy loss; absent: every weight 1.
    is_weights: Optional[jax.Array] = None

    @classmethod
    def from_rollout(
        cls,
        sequences: Batch,
        scored: Batch,
        estimates: Batch,
        config: PPOConfig,
        correction: Any = None,
    ) -> PPOBatch:
        """The update's batch from the rollout's sequences, `score`'s output and the
        estimates. The reference's log-probs join when the loss has a KL term, or when
        the update logs the KL itself (a single-step update, without old_logprobs).
        `correction` (a `rollout_correction.Correction`): its weights multiply the
        policy loss and the tokens it rejects leave the loss mask."""
        with_reference = bool(config.kl_loss_coef) or "old_logprobs" not in scored
        loss_mask = sequences["loss_mask"]
        if correction is not None:
            loss_mask = loss_mask & correction.mask
        return cls(
            tokens=sequences["tokens"],
            input_mask=sequences["input_mask"],
            loss_mask=loss_mask,
            advantages=estimates["advantages"],
            old_logprobs=scored.get("old_logprobs"),
            old_values=scored.get("old_values"),
            returns=estimates.get("returns"),
            ref_logprobs=scored.get("ref_logprobs") if with_reference else None,
            is_weights=None if correction is None else correction.weights,
        )

    def as_dict(self) -> Batch:
        return {name: value for name, value in self.items() if value is not None}


def _required_keys(config: PPOConfig) -> tuple[str, ...]:
    keys = ("tokens", "input_mask", "loss_mask", "old_logprobs", "advantages")
    if config.use_value:
        keys += ("old_values", "returns")
    if config.kl_loss_coef:
        keys += ("ref_logprobs",)
    return keys


def _check_batch(batch: Batch, config: PPOConfig) -> Batch:
    """The keys this config reads, shape-checked; other keys are dropped (not shuffled).

    A single-step update may go without old_logprobs (see `score`); it then logs
    the KL to the reference (kl_k1/k2/k3) from ref_logprobs when the batch has them.
    """
    keys = _required_keys(config)
    optional = ("is_weights",)
    if single_step(config):
        keys = tuple(k for k in keys if k != "old_logprobs")
        optional += ("old_logprobs", "ref_logprobs")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(
            f"The PPO batch lacks {missing} (this PPOConfig reads {list(keys)});"
            " old_logprobs/old_values/ref_logprobs come from ppo.score."
        )
    batch = {k: batch[k] for k in (*keys, *optional) if k in batch}
    chex.assert_rank(batch["tokens"], 2)
    chex.assert_equal_shape(list(batch.values()))
    rows = batch["tokens"].shape[0]
    per_update = config.num_minibatches * config.num_microbatches
    if rows % per_update:
        raise ValueError(
            f"{rows} rows cannot be split into num_minibatches={config.num_minibatches}"
            f" x num_microbatches={config.num_microbatches}."
        )
    return batch


def _combine(aux: dict, other: dict) -> dict:
    return {
        "mean": jax.tree.map(jnp.add, aux["mean"], other["mean"]),
        "max": jax.tree.map(jnp.maximum, aux["max"], other["max"]),
    }


def _minibatch_gradients(
    params: Any,
    minibatch: Batch,
    models: ActorCritic,
    config: PPOConfig,
    shared: Optional[SharedPrompts] = None,
) -> tuple[Any, dict]:
    """Gradient of the minibatch's loss, accumulated over config.num_microbatches; the
    loss's side outputs are means (summed over micro-batches) and maxima."""
    normalizers = loss_normalizers(minibatch)
    grad_fn = functools.partial(
        jax.grad(ppo_loss, has_aux=True),
        models=models,
        config=config,
        normalizers=normalizers,
        shared=shared,
    )
    filled = lambda shapes, value: jax.tree.map(lambda s: jnp.full(s.shape, value, s.dtype), shapes)
    return accumulate_gradients(
        grad_fn,
        params,
        minibatch,
        config.num_microbatches,
        combine=_combine,
        identity=lambda shapes: {
            "mean": filled(shapes["mean"], 0.0),
            "max": filled(shapes["max"], -jnp.inf),
        },
    )


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over valid tokens; NaN when returns are constant.

    1 is a perfect critic, 0 one no better than a constant, < 0 worse.
    """
    returns_variance = masked_variance(returns, mask)
    ev = 1.0 - masked_variance(returns - values, mask) / returns_variance
    return jnp.where(returns_variance > 0, ev, jnp.nan)


def ppo_update(
    state: TrainState,
    batch: PPOBatch | Batch,
    *,
    models: ActorCritic,
    tx: optax.GradientTransformation,
    config: PPOConfig,
    lr_schedule: Optional[optax.Schedule] = None,
    shared: Optional[SharedPrompts] = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """num_epochs x num_minibatches optimizer steps on one rollout batch, in one program.

    batch: {tokens, input_mask, loss_mask, old_logprobs, advantages} [N, L],
    plus old_values and returns when config.use_value and ref_logprobs when
    config.kl_loss_coef > 0. Advantages are whitened over the valid tokens of
    the whole batch first (if configured). Each epoch draws a permutation of
    the rows from state.rng; minibatch i of it takes rows i, i + M, ... (as
    split_microbatches, so every minibatch keeps a share of every batch
    shard). state.step rises by num_epochs * num_minibatches.

    `shared` (SharedPrompts, as `score` took it: K consecutive rows a prompt): every
    micro-batch runs the prompts of its rows once, whatever rows the shuffle gave it
    (the same minibatches and gradients; the K rows' prompt work done once).

    Metrics are means over the optimizer steps (ratio_max a max), plus
    grad_norm, param_norm, lr, batch statistics, and `finite`: 1.0 when every
    step's loss and gradient norm and the new params' norm are finite.
    """
    if isinstance(batch, PPOBatch):
        batch = batch.as_dict()
    batch = _check_batch(batch, config)
    valid = _valid(batch)
    raw_advantages = jnp.where(valid, batch["advantages"].astype(jnp.float32), 0.0)
    if config.whiten_advantages:
        batch["advantages"] = whiten(raw_advantages, valid)
    else:
        batch["advantages"] = raw_advantages
    rng, shuffle_rng = jax.random.split(state.rng)
    rows = batch["tokens"].shape[0]
    if shared is not None and shared.columns:
        if rows % shared.rows:
            raise ValueError(f"{rows} rows are not groups of {shared.rows} (SharedPrompts).")
        batch["prompt_ids"] = jnp.arange(rows, dtype=jnp.int32) // shared.rows
        shared = shared._replace(prompts=rows // shared.rows)

    def minibatch_step(carry, minibatch):
        params, opt_state, step = carry
        grads, aux = _minibatch_gradients(params, minibatch, models, config, shared)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {**aux["mean"], **aux["max"], "grad_norm": optax.tree.norm(grads)}
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(step), jnp.float32)
        return (params, opt_state, step + 1), metrics

    def epoch(carry, key):
        order = jax.random.permutation(key, rows)
        shuffled = jax.tree.map(lambda x: x[order], batch)
        return jax.lax.scan(
            minibatch_step, carry, split_microbatches(shuffled, config.num_minibatches)
        )

    (params, opt_state, step), history = jax.lax.scan(
        epoch,
        (state.params, state.opt_state, state.step),
        jax.random.split(shuffle_rng, config.num_epochs),
    )
    metrics = _update_metrics(history, params, batch, valid, raw_advantages, config)
    new_state = TrainState(step=step, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


def _update_metrics(history, params, batch, valid, raw_advantages, config) -> dict:
    """The update's metrics: means over its optimizer steps (maxima for *_max), the new
    params' norm, `finite`, and the batch's advantage and value statistics."""
    metrics = {
        name: per_step.max() if name.endswith("_max") else per_step.mean()
        for name, per_step in history.items()
    }
    param_norm = optax.tree.norm(params)
    finite = (
        jnp.isfinite(history["loss"]).all()
        & jnp.isfinite(history["grad_norm"]).all()
        & jnp.isfinite(param_norm)
    )
    rows_with_targets = jnp.maximum(valid.any(axis=1).sum(), 1)
    metrics.update(
        param_norm=param_norm,
        finite=finite.astype(jnp.float32),
        target_tokens=valid.sum().astype(jnp.float32),
        advantage_mean=masked_mean(raw_advantages, valid),
        advantage_std=jnp.sqrt(masked_variance(raw_advantages, valid)),
        # Rows that carry any signal: GRPO's zero-variance groups do not.
        nonzero_advantage_fraction=(raw_advantages != 0).any(axis=1).sum() / rows_with_targets,
    )
    if config.use_value:
        metrics.update(
            explained_variance=explained_variance(batch["old_values"], batch["returns"], valid),
            return_mean=masked_mean(batch["returns"], valid),
            value_mean=masked_mean(batch["old_values"], valid),
        )
    return metrics


def make_ppo_update(
    models: ActorCritic, tx: optax.GradientTransformation, config: PPOConfig, **options
) -> Any:
    """Binds the static parts, leaving the pure `update(state, batch)`."""
    return functools.partial(ppo_update, models=models, tx=tx, config=config, **options)


# --- the train state of an ActorCritic ------------------------------------------
# Without a critic the policy's own params; with one, {"policy", "critic"} in one
# tree that one optimizer updates (one TrainState, one checkpoint item).


def trained(models: ActorCritic) -> ts.Trained:
    """What the TrainState holds parameters of, for train_state's functions."""
    if models.critic is None:
        return models.policy
    return functools.partial(_init_params, models)


def _init_params(models: ActorCritic, rng: jax.Array) -> Any:
    policy_rng, critic_rng = jax.random.split(rng)
    return {
        "policy": init_params(models.policy, policy_rng),
        "critic": init_params(models.critic, critic_rng),
    }


def ppo_state_shardings(
    models: ActorCritic, tx: optax.GradientTransformation, mesh: Mesh, rules: shd.Rules
) -> TrainState:
    """Shardings of the TrainState of `models` (for jit_step and checkpoints)."""
    return ts.state_shardings(trained(models), tx, mesh, rules)


def create_ppo_state(
    models: ActorCritic,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: shd.Rules,
    seed: int,
    params: Optional[Any] = None,
    **options: Any,
) -> TrainState:
    """Initialises (or adopts `params`, {"policy", "critic"} with a critic) in its shardings
    (`options`: `train_state.create_train_state`'s, e.g. donate=True to take their buffers)."""
    return ts.create_train_state(trained(models), tx, mesh, rules, seed, params, **options)


def abstract_ppo_state(
    models: ActorCritic, tx: optax.GradientTransformation, mesh: Mesh, rules: shd.Rules
) -> TrainState:
    """ShapeDtypeStructs with shardings: the target for restoring a checkpoint."""
    return ts.abstract_train_state(trained(models), tx, mesh, rules)

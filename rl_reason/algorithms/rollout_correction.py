"""The sampler/learner mismatch: measured every iteration, and corrected in the loss.

The sampler's log-probs (`Rollout.logprobs`: a KV-cache decode, possibly in
bfloat16 with a bfloat16 copy of the weights) and the learner's (a full
forward in the training precision, `ppo.score`'s "old_logprobs") score the
same sampled tokens. In float32 on one code path they agree within 1e-5; with
a bfloat16 sampler they do not, and a PPO ratio taken against the sampler's
log-probs, or an update that ignores the gap, trains on off-policy data as if
it were on-policy: the collapse reported in verl #2996, open-instruct #1473,
NeMo-RL #4243.

Two pure pieces, float32 throughout, for arrays of any shape [..., T] with a
mask of the tokens that count (a PPO batch's valid completion tokens):

- `mismatch_metrics(learner, sampler, mask)`: the gap, as scalars to log every
  iteration (the names below, under "mismatch/").
- `correct(mode, learner, sampler, mask, cap)` -> (weights, mask): the
  importance correction of one registered mode. The PPO loss multiplies its
  per-token policy loss by `weights` and takes `mask` (ANDed with its own) as
  the tokens that count, numerator and denominator alike. Both are constants
  of the update: compute them from the learner's recomputed old log-probs,
  outside the gradient.

The modes (verl's rollout correction and TRL's vllm_importance_sampling_mode
name the same things; see docs/precision.md for the choice):

    none          weights 1, mask unchanged (metrics only)
    token_tis     w_t = min(rho_t, C)                       truncated IS, per token
    token_mis     w_t = rho_t, tokens with rho_t outside [1/C, C] leave the loss
    sequence_tis  w = min(g, C) on every token of the row   g = exp(mean_t log rho_t),
    sequence_mis  w = g, rows with g outside [1/C, C] leave     the geometric mean

with rho_t = exp(learner_t - sampler_t), the ratio pi_learner / pi_sampler on
the sampled token. C defaults to 2 for the token modes and 1.1 for the
sequence modes (`DEFAULT_CAPS`): a geometric mean needs a tighter band. Log-ratios are bounded to [-20, 20] before exp (verl's
safety bound) so that no weight overflows; they are 0 off the mask.

Exactness: where learner == sampler, every log-ratio is exactly 0, every
ratio exactly 1.0, and every mode returns weights that are all exactly 1.0
and the mask unchanged, for any C >= 1: a run whose sampler and learner agree
is bitwise what it would be without the correction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

# verl's safety bound on log-ratios (exp(20) ~ 5e8): keeps weights finite.
LOG_RATIO_BOUND = 20.0
# The token-ratio band whose outside fraction `mismatch_metrics` reports.
RATIO_BAND = 2.0
# Defaults (docs/precision.md says why): token TIS at TIS's cap of 2 (Yao et al.'s
# "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", verl's
# token_is() preset, TRL's first default). A geometric mean needs a far tighter band
# than a token ratio: 1.1 is ~4x the worst row measured with a bfloat16 sampler on
# Gemma 3 270M (|log g| <= 0.023), so healthy rows pass and only outlier rows act.
DEFAULT_MODE = "token_tis"
DEFAULT_CAPS = {
    "none": 2.0,
    "token_tis": 2.0,
    "token_mis": 2.0,
    "sequence_tis": 1.1,
    "sequence_mis": 1.1,
}


class Correction(NamedTuple):
    """weights [..., T] float32 (1.0 where the returned mask is False) and mask [..., T] bool."""

    weights: jax.Array
    mask: jax.Array


def log_ratios(learner: jax.Array, sampler: jax.Array, mask: jax.Array) -> jax.Array:
    """log(pi_learner / pi_sampler) per token, float32, 0 off the mask, bounded to +-20."""
    diff = learner.astype(jnp.float32) - sampler.astype(jnp.float32)
    return jnp.where(mask, jnp.clip(diff, -LOG_RATIO_BOUND, LOG_RATIO_BOUND), 0.0)


def sequence_log_ratios(log_ratio: jax.Array, mask: jax.Array) -> jax.Array:
    """[..., 1]: the mean log-ratio over each row's masked tokens (0 for an empty row),
    the log of the geometric mean of the row's token ratios."""
    count = jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.float32)
    return jnp.sum(log_ratio, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)


def _none(log_ratio, mask, cap):
    del cap
    return Correction(jnp.ones(log_ratio.shape, jnp.float32), mask)


def _token_tis(log_ratio, mask, cap):
    weights = jnp.minimum(jnp.exp(log_ratio), jnp.float32(cap))
    return Correction(jnp.where(mask, weights, 1.0), mask)


def _inside(log_ratio, cap):
    # In log space, so that the band is symmetric bit for bit: [-log C, log C].
    bound = jnp.log(jnp.float32(cap))
    return (log_ratio >= -bound) & (log_ratio <= bound)


def _token_mis(log_ratio, mask, cap):
    keep = mask & _inside(log_ratio, cap)
    return Correction(jnp.where(keep, jnp.exp(log_ratio), 1.0), keep)


def _sequence_tis(log_ratio, mask, cap):
    geometric = jnp.exp(sequence_log_ratios(log_ratio, mask))
    weights = jnp.broadcast_to(jnp.minimum(geometric, jnp.float32(cap)), log_ratio.shape)
    return Correction(jnp.where(mask, weights, 1.0), mask)


def _sequence_mis(log_ratio, mask, cap):
    seq = sequence_log_ratios(log_ratio, mask)
    keep = mask & _inside(seq, cap)
    weights = jnp.broadcast_to(jnp.exp(seq), log_ratio.shape)
    return Correction(jnp.where(keep, weights, 1.0), keep)


CorrectionFn = Callable[[jax.Array, jax.Array, float], Correction]

MODES: dict[str, CorrectionFn] = {
    "none": _none,
    "token_tis": _token_tis,
    "token_mis": _token_mis,
    "sequence_tis": _sequence_tis,
    "sequence_mis": _sequence_mis,
}


def check(mode: str, cap: float | None) -> None:
    """Raises ValueError for an unknown mode or a cap below 1 (which would reject or
    down-weight tokens where the two sides agree)."""
    if mode not in MODES:
        raise ValueError(f"Unknown rollout correction {mode!r}; choose one of {sorted(MODES)}.")
    if cap is None or not cap >= 1.0:
        raise ValueError(f"The rollout correction's cap C must be >= 1, got {cap}.")


def correct(
    mode: str,
    learner_logprobs: jax.Array,
    sampler_logprobs: jax.Array,
    mask: jax.Array,
    cap: float | None = None,
) -> Correction:
    """(weights, mask) of correction `mode` for the sampled tokens under `mask`.

    learner_logprobs, sampler_logprobs [..., T]: log-probs of the same tokens
    under the learner (recomputed, old) and the sampler; mask [..., T] bool:
    the tokens the loss counts. The last axis is the sequence (sequence_*
    modes take their geometric mean along it). cap: C, None for the mode's
    DEFAULT_CAPS entry.
    """
    if cap is None and mode in DEFAULT_CAPS:
        cap = DEFAULT_CAPS[mode]
    check(mode, cap)
    mask = jnp.asarray(mask, bool)
    log_ratio = log_ratios(learner_logprobs, sampler_logprobs, mask)
    weights, keep = MODES[mode](log_ratio, mask, cap)
    return Correction(jax.lax.stop_gradient(weights), keep)


def _masked_stats(x: jax.Array, mask: jax.Array, neutral: float) -> tuple:
    """(mean, min, max) of x over mask; `neutral` for all three when the mask is empty."""
    count = jnp.sum(mask).astype(jnp.float32)
    mean = jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(count, 1.0)
    low = jnp.min(jnp.where(mask, x, jnp.inf))
    high = jnp.max(jnp.where(mask, x, -jnp.inf))
    some = count > 0
    pick = lambda v: jnp.where(some, v, jnp.float32(neutral))
    return pick(mean), pick(low), pick(high)


def mismatch_metrics(
    learner_logprobs: jax.Array, sampler_logprobs: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """The sampler-vs-learner gap on the sampled tokens, float32 scalars.

    kl_k3_mean, kl_k3_max: k3 = rho - 1 - log rho per token, an unbiased,
        non-negative estimate of KL(sampler || learner) on the sampler's tokens.
    kl_k1_mean: mean(sampler - learner), the same KL's plain estimate (may be < 0).
    logp_abs_diff_mean, logp_abs_diff_max: |learner - sampler| (TRL's
        sampling_logp_difference).
    ratio_mean, ratio_min, ratio_max: the token ratio rho = exp(learner - sampler).
    ratio_outside: fraction of tokens with rho outside [1/2, 2].
    seq_ratio_mean, seq_ratio_min, seq_ratio_max: per row with any token, the
        geometric mean of its token ratios.
    seq_log_ratio_abs_max: the largest |sum_t log rho_t| of a row (the log of
        TRL's and verl's sequence-level product ratio).
    tokens, sequences: how many tokens and rows were measured.

    Exactly 0 (KL, differences, outside fraction) and 1 (ratios) where the
    two sides agree; the same neutral values for an empty mask.
    """
    mask = jnp.asarray(mask, bool)
    log_ratio = log_ratios(learner_logprobs, sampler_logprobs, mask)
    ratio = jnp.exp(log_ratio)
    # expm1: rho - 1 without the cancellation that rounds a 1e-7 gap's k3 to 0.
    k3 = jnp.where(mask, jnp.expm1(log_ratio) - log_ratio, 0.0)
    out = {}
    out["kl_k3_mean"], _, out["kl_k3_max"] = _masked_stats(k3, mask, 0.0)
    out["kl_k1_mean"], _, _ = _masked_stats(-log_ratio, mask, 0.0)
    out["logp_abs_diff_mean"], _, out["logp_abs_diff_max"] = _masked_stats(
        jnp.abs(log_ratio), mask, 0.0
    )
    out["ratio_mean"], out["ratio_min"], out["ratio_max"] = _masked_stats(ratio, mask, 1.0)
    outside = (log_ratio > jnp.log(RATIO_BAND)) | (log_ratio < -jnp.log(RATIO_BAND))
    out["ratio_outside"], _, _ = _masked_stats(outside.astype(jnp.float32), mask, 0.0)
    rows = jnp.any(mask, axis=-1)
    seq = jnp.exp(sequence_log_ratios(log_ratio, mask)[..., 0])
    out["seq_ratio_mean"], out["seq_ratio_min"], out["seq_ratio_max"] = _masked_stats(
        seq, rows, 1.0
    )
    _, _, out["seq_log_ratio_abs_max"] = _masked_stats(
        jnp.abs(jnp.sum(log_ratio, axis=-1)), rows, 0.0
    )
    out["tokens"] = jnp.sum(mask).astype(jnp.float32)
    out["sequences"] = jnp.sum(rows).astype(jnp.float32)
    return jax.lax.stop_gradient(out)


def correction_metrics(correction: Correction, mask: jax.Array) -> dict[str, jax.Array]:
    """What a correction did to the tokens under `mask` (the mask it was given).

    weight_mean, weight_min, weight_max: the weights of the tokens it kept;
    rejected: the fraction of the masked tokens it removed (the *_mis modes).
    """
    mask = jnp.asarray(mask, bool)
    out = {}
    out["weight_mean"], out["weight_min"], out["weight_max"] = _masked_stats(
        correction.weights, correction.mask, 1.0
    )
    removed = (mask & ~correction.mask).astype(jnp.float32)
    out["rejected"], _, _ = _masked_stats(removed, mask, 0.0)
    return out


def measure_and_correct(
    mode: str,
    learner_logprobs: jax.Array,
    sampler_logprobs: jax.Array,
    mask: jax.Array,
    cap: float | None = None,
    prefix: str = "mismatch/",
) -> tuple[Correction, dict[str, jax.Array]]:
    """One iteration's correction and its metrics, for a loop to call once per batch:
    (correct(...), {prefix + mismatch_metrics, prefix + "correction/" + correction_metrics})."""
    correction = correct(mode, learner_logprobs, sampler_logprobs, mask, cap)
    metrics = {
        prefix + k: v for k, v in mismatch_metrics(learner_logprobs, sampler_logprobs, mask).items()
    }
    for k, v in correction_metrics(correction, mask).items():
        metrics[f"{prefix}correction/{k}"] = v
    return correction, metrics

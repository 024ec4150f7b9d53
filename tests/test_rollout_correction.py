"""Rollout correction against an independent NumPy reference on random masked batches;
exactly 1 where sampler and learner agree; what the PPO loss gets from it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_reason.algorithms import rollout_correction as rc

MODES = sorted(rc.MODES)
# Jitted: eagerly, every operation compiles for every new shape, which costs more.
correct = jax.jit(rc.correct, static_argnums=(0, 4))
mismatch_metrics = jax.jit(rc.mismatch_metrics)


def _batch(seed, shape=(6, 9), spread=0.4):
    """Learner and sampler log-probs of sampled tokens, a ragged mask with an empty row."""
    rng = np.random.default_rng(seed)
    sampler = -rng.exponential(1.0, shape).astype(np.float32)
    row_shift = rng.normal(0.0, 2 * spread, (*shape[:-1], 1))  # rows far apart too
    learner = (sampler + row_shift + rng.normal(0.0, spread, shape)).astype(np.float32)
    lengths = rng.integers(1, shape[-1] + 1, shape[:-1])
    lengths.reshape(-1)[0] = 0  # a row with no token
    mask = np.arange(shape[-1]) < lengths[..., None]
    # Off the mask the sampler scores 0 and the learner anything (a padded forward).
    sampler = np.where(mask, sampler, 0.0).astype(np.float32)
    learner = np.where(mask, learner, rng.normal(0, 50, shape)).astype(np.float32)
    return learner, sampler, mask


def _reference(mode, learner, sampler, mask, cap):
    """Row by row, token by token, in float64: (weights on kept tokens, kept mask)."""
    weights = np.ones(learner.shape, np.float64)
    keep = mask.copy()
    flat_w, flat_k = weights.reshape(-1, learner.shape[-1]), keep.reshape(-1, learner.shape[-1])
    flat_l, flat_s = learner.reshape(flat_w.shape), sampler.reshape(flat_w.shape)
    flat_m = mask.reshape(flat_w.shape)
    for r in range(flat_w.shape[0]):
        tokens = [t for t in range(flat_w.shape[1]) if flat_m[r, t]]
        logs = {t: float(flat_l[r, t]) - float(flat_s[r, t]) for t in tokens}
        geo = np.exp(np.mean(list(logs.values()))) if tokens else 1.0
        for t in tokens:
            ratio = np.exp(logs[t])
            if mode == "token_tis":
                flat_w[r, t] = min(ratio, cap)
            elif mode == "token_mis":
                if 1 / cap <= ratio <= cap:
                    flat_w[r, t] = ratio
                else:
                    flat_k[r, t] = False
            elif mode == "sequence_tis":
                flat_w[r, t] = min(geo, cap)
            elif mode == "sequence_mis":
                if 1 / cap <= geo <= cap:
                    flat_w[r, t] = geo
                else:
                    flat_k[r, t] = False
    return weights, keep


@pytest.mark.parametrize("cap", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("mode", MODES)
def test_correction_matches_numpy(mode, cap):
    rejected = kept = 0
    for seed in range(3):
        learner, sampler, mask = _batch(seed)
        weights, keep = correct(mode, learner, sampler, mask, cap)
        want_w, want_k = _reference(mode, learner, sampler, mask, cap)
        np.testing.assert_array_equal(np.asarray(keep), want_k)
        assert keep.dtype == bool and weights.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(weights), want_w, rtol=2e-6, atol=0)
        kept += want_k.sum()
        rejected += mask.sum() - want_k.sum()
    if mode.endswith("mis"):  # the batches exercise both sides of the band
        assert kept > 0 and rejected > 0


def test_denominators_follow_the_mask():
    """A token-mean loss with the correction: kept tokens in numerator and denominator."""
    learner, sampler, mask = _batch(0)
    per_token = np.random.default_rng(5).normal(size=mask.shape).astype(np.float32)
    for mode in MODES:
        weights, keep = correct(mode, learner, sampler, mask, 2.0)
        loss = (np.asarray(weights) * per_token * keep).sum() / max(np.asarray(keep).sum(), 1)
        want_w, want_k = _reference(mode, learner, sampler, mask, 2.0)
        want = (want_w * per_token * want_k).sum() / want_k.sum()
        np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_leading_axes_and_sequence_products():
    """[micro, rows, T] batches: the sequence modes reduce the last axis only."""
    learner, sampler, mask = _batch(7, shape=(2, 3, 8))
    for mode in MODES:
        got = correct(mode, learner, sampler, mask, 2.0)
        want_w, want_k = _reference(mode, learner, sampler, mask, 2.0)
        np.testing.assert_array_equal(np.asarray(got.mask), want_k)
        np.testing.assert_allclose(np.asarray(got.weights), want_w, rtol=2e-6)
    # the sequence ratio is the geometric mean: exp(mean log), and its product's log is the sum
    metrics = mismatch_metrics(learner, sampler, mask)
    logs = np.where(mask, learner.astype(np.float64) - sampler, 0.0)
    rows = mask.any(-1)
    geo = np.exp(logs.sum(-1)[rows] / mask.sum(-1)[rows])
    np.testing.assert_allclose(metrics["seq_ratio_min"], geo.min(), rtol=1e-5)
    np.testing.assert_allclose(metrics["seq_ratio_max"], geo.max(), rtol=1e-5)
    np.testing.assert_allclose(metrics["seq_ratio_mean"], geo.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        metrics["seq_log_ratio_abs_max"], np.abs(logs.sum(-1)[rows]).max(), rtol=1e-5
    )


def test_metrics_match_numpy():
    learner, sampler, mask = _batch(3, spread=0.6)
    got = mismatch_metrics(learner, sampler, mask)
    log_ratio = (learner.astype(np.float64) - sampler)[mask]
    ratio = np.exp(log_ratio)
    k3 = ratio - 1 - log_ratio
    want = {
        "kl_k3_mean": k3.mean(),
        "kl_k3_max": k3.max(),
        "kl_k1_mean": -log_ratio.mean(),
        "logp_abs_diff_mean": np.abs(log_ratio).mean(),
        "logp_abs_diff_max": np.abs(log_ratio).max(),
        "ratio_mean": ratio.mean(),
        "ratio_min": ratio.min(),
        "ratio_max": ratio.max(),
        "ratio_outside": np.mean((ratio < 0.5) | (ratio > 2.0)),
        "tokens": mask.sum(),
        "sequences": mask.any(-1).sum(),
    }
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=1e-7, err_msg=name)
    assert 0 < want["ratio_outside"] < 1
    assert all(v.dtype == jnp.float32 for v in got.values())


@pytest.mark.parametrize("cap", [1.0, 2.0])
def test_exactly_one_where_sampler_and_learner_agree(cap):
    """Bitwise: weights all 1.0, mask unchanged, metrics at their neutral values."""
    _, sampler, mask = _batch(1)
    learner = np.where(mask, sampler, 3.0).astype(np.float32)  # padding may differ
    for mode in MODES:
        weights, keep = correct(mode, learner, sampler, mask, cap)
        assert np.asarray(weights).tobytes() == np.ones(mask.shape, np.float32).tobytes(), mode
        np.testing.assert_array_equal(np.asarray(keep), mask)
        stats = rc.correction_metrics(rc.Correction(weights, keep), mask)
        assert float(stats["rejected"]) == 0.0 and float(stats["weight_max"]) == 1.0
    metrics = mismatch_metrics(learner, sampler, mask)
    for name in ("kl_k3_mean", "kl_k3_max", "kl_k1_mean", "logp_abs_diff_max", "ratio_outside"):
        assert float(metrics[name]) == 0.0, name
    for name in ("ratio_mean", "ratio_min", "ratio_max", "seq_ratio_min", "seq_ratio_max"):
        assert float(metrics[name]) == 1.0, name


def test_empty_mask_and_extreme_gaps_stay_finite():
    shape = (3, 5)
    empty = np.zeros(shape, bool)
    zeros = np.zeros(shape, np.float32)
    metrics = mismatch_metrics(zeros, zeros, empty)
    assert float(metrics["ratio_min"]) == 1.0 and float(metrics["tokens"]) == 0.0
    for mode in MODES:
        weights, keep = correct(mode, zeros, zeros, empty, 2.0)
        assert not np.asarray(keep).any() and (np.asarray(weights) == 1.0).all()
    # a token 1000 nats apart: bounded, finite, truncated or rejected
    learner = zeros.copy()
    learner[0, 0] = 1000.0
    mask = np.ones(shape, bool)
    assert np.isfinite(np.asarray(list(mismatch_metrics(learner, zeros, mask).values()))).all()
    assert float(correct("token_tis", learner, zeros, mask, 2.0).weights[0, 0]) == 2.0
    assert not bool(correct("token_mis", learner, zeros, mask, 2.0).mask[0, 0])


def test_weights_carry_no_gradient():
    learner, sampler, mask = _batch(2)

    def loss(lp):
        weights, keep = rc.correct("token_tis", lp, sampler, mask, 2.0)
        return jnp.sum(weights * keep)

    assert not np.asarray(jax.grad(loss)(jnp.asarray(learner))).any()


def test_unknown_mode_and_bad_cap():
    learner, sampler, mask = _batch(0)
    with pytest.raises(ValueError, match="Unknown rollout correction"):
        rc.correct("tis", learner, sampler, mask)
    with pytest.raises(ValueError, match=">= 1"):
        rc.correct("token_mis", learner, sampler, mask, 0.5)


def test_default_caps():
    learner, sampler, mask = _batch(4)
    assert set(rc.DEFAULT_CAPS) == set(rc.MODES) and rc.DEFAULT_MODE in rc.MODES
    for mode in MODES:
        default = rc.correct(mode, learner, sampler, mask)
        explicit = rc.correct(mode, learner, sampler, mask, rc.DEFAULT_CAPS[mode])
        np.testing.assert_array_equal(np.asarray(default.weights), np.asarray(explicit.weights))
        np.testing.assert_array_equal(np.asarray(default.mask), np.asarray(explicit.mask))


def test_measure_and_correct_is_the_pieces_together():
    learner, sampler, mask = _batch(6)
    fn = jax.jit(rc.measure_and_correct, static_argnums=(0, 4))
    correction, metrics = fn("token_mis", learner, sampler, mask, 1.5)
    want = correct("token_mis", learner, sampler, mask, 1.5)
    np.testing.assert_array_equal(np.asarray(correction.weights), np.asarray(want.weights))
    np.testing.assert_array_equal(np.asarray(correction.mask), np.asarray(want.mask))
    separate = mismatch_metrics(learner, sampler, mask)
    for k, v in separate.items():
        assert float(metrics["mismatch/" + k]) == float(v), k
    assert float(metrics["mismatch/correction/rejected"]) > 0

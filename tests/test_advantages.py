"""GAE, whitening, group baselines and the KL pieces against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_reason.algorithms import advantages as adv
from rl_reason.algorithms import kl

# --- GAE ---------------------------------------------------------------------


def test_gae_matches_a_hand_computation():
    # Two prompt tokens, three completion tokens, one pad; gamma .9, lam .8.
    mask = np.array([[0, 0, 1, 1, 1, 0]], bool)
    rewards = np.array([[5.0, 5.0, 0.0, 0.0, 1.0, 7.0]], np.float32)  # 5, 7: off the mask
    values = np.array([[3.0, 3.0, 0.5, 0.6, 0.7, 9.0]], np.float32)
    # deltas: t4 = 1 + 0 - .7 = .3 (terminal), t3 = .9*.7 - .6 = .03, t2 = .9*.6 - .5 = .04
    # A4 = .3, A3 = .03 + .72*.3 = .246, A2 = .04 + .72*.246 = .21712
    advantages, returns = adv.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(advantages, [[0, 0, 0.21712, 0.246, 0.3, 0]], atol=1e-6)
    np.testing.assert_allclose(returns, [[0, 0, 0.71712, 0.846, 1.0, 0]], atol=1e-6)


def _numpy_gae(rewards, values, mask, gamma, lam):
    """The textbook recursion, row by row over that row's valid tokens, terminal after the last."""
    advantages = np.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[row])
        running, next_value = 0.0, 0.0
        for t in idx[::-1]:
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            running = delta + gamma * lam * running
            advantages[row, t] = running
            next_value = values[row, t]
    returns = np.where(mask, advantages + values, 0.0)
    return advantages, returns


def _rollout_masks(rng, rows, prompt_len, gen_len):
    """Left-padded prompts, completions of random length (some empty), right padding."""
    input_mask = np.zeros((rows, prompt_len + gen_len), bool)
    loss_mask = np.zeros_like(input_mask)
    for r in range(rows):
        p = rng.integers(1, prompt_len + 1)
        g = rng.integers(0, gen_len + 1)
        input_mask[r, prompt_len - p : prompt_len + g] = True
        loss_mask[r, prompt_len : prompt_len + g] = True
    return input_mask, loss_mask


@pytest.mark.parametrize(
    "gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0), (0.0, 0.0), (1.0, 0.0)]
)
def test_gae_matches_numpy_on_random_rollouts(gamma, lam):
    rng = np.random.default_rng(0)
    _, mask = _rollout_masks(rng, 16, 5, 9)
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)
    gae = jax.jit(adv.gae, static_argnames=("gamma", "lam"))
    got = gae(rewards, values, mask, gamma=gamma, lam=lam)
    want = _numpy_gae(rewards, values, mask, gamma, lam)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_gae_edge_cases_have_their_closed_forms():
    rng = np.random.default_rng(1)
    _, mask = _rollout_masks(rng, 8, 3, 6)
    rewards = np.where(mask, rng.normal(size=mask.shape), 0).astype(np.float32)
    values = np.where(mask, rng.normal(size=mask.shape), 0).astype(np.float32)
    gamma = 0.9
    # lam = 1: the discounted return-to-go minus the value.
    got, returns = adv.gae(rewards, values, mask, gamma, 1.0)
    to_go = np.zeros_like(rewards)
    for r in range(rewards.shape[0]):
        acc = 0.0
        for t in np.flatnonzero(mask[r])[::-1]:
            acc = rewards[r, t] + gamma * acc
            to_go[r, t] = acc
    np.testing.assert_allclose(got, np.where(mask, to_go - values, 0), atol=1e-5)
    np.testing.assert_allclose(returns, to_go, atol=1e-5)
    # gamma = lam = 0: the one-step advantage r - V.
    got, _ = adv.gae(rewards, values, mask, 0.0, 0.0)
    np.testing.assert_allclose(got, np.where(mask, rewards - values, 0), atol=1e-6)
    # lam = 0: the TD error r + gamma V(next) - V, with V = 0 after the last token.
    got, _ = adv.gae(rewards, values, mask, gamma, 0.0)
    next_values = np.where(mask[:, 1:], values[:, 1:], 0)
    td = rewards + gamma * np.pad(next_values, ((0, 0), (0, 1))) - values
    np.testing.assert_allclose(got, np.where(mask, td, 0), atol=1e-6)


def test_gae_ignores_everything_off_the_mask():
    rng = np.random.default_rng(2)
    _, mask = _rollout_masks(rng, 8, 4, 6)
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)
    base = adv.gae(rewards, values, mask, 0.95, 0.9)
    noise = lambda: np.where(mask, 0, rng.normal(size=mask.shape) * 100).astype(np.float32)
    moved = adv.gae(rewards + noise(), values + noise(), mask, 0.95, 0.9)
    for a, b in zip(base, moved):
        np.testing.assert_array_equal(a, b)
        assert not np.asarray(a)[~mask].any()


# --- whitening -----------------------------------------------------------------


def test_whiten_gives_zero_mean_unit_std_over_valid_entries():
    rng = np.random.default_rng(3)
    _, mask = _rollout_masks(rng, 8, 4, 6)
    x = (3.0 + 5.0 * rng.normal(size=mask.shape)).astype(np.float32)
    white = np.asarray(adv.whiten(x, mask))
    np.testing.assert_allclose(white[mask].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(white[mask].std(), 1.0, atol=1e-4)
    assert not white[~mask].any()
    kept = np.asarray(adv.whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(kept[mask].mean(), x[mask].mean(), rtol=1e-4)
    np.testing.assert_allclose(kept[mask].std(), 1.0, atol=1e-4)


# --- group baselines -------------------------------------------------------------

# Two prompts x three samples, prompt-major.
REWARDS = np.array([1.0, 0.0, 0.0, 0.5, 1.0, 0.0], np.float32)
# Prompt 0: mean 1/3, sample std sqrt(1/3); prompt 1: mean .5, sample std .5.
S = np.sqrt(1 / 3)
HAND = {
    "grpo": [(2 / 3) / S, (-1 / 3) / S, (-1 / 3) / S, 0.0, 1.0, -1.0],
    "grpo_no_std": [2 / 3, -1 / 3, -1 / 3, 0.0, 0.5, -0.5],
    "dr_grpo": [2 / 3, -1 / 3, -1 / 3, 0.0, 0.5, -0.5],
    # r_i minus the mean of the other two.
    "rloo": [1.0, -0.5, -0.5, 0.0, 0.75, -0.75],
}


@pytest.mark.parametrize("method", sorted(HAND))
def test_group_advantages_match_hand_values(method):
    got = adv.group_advantages(jnp.asarray(REWARDS), 3, method)
    np.testing.assert_allclose(got, HAND[method], atol=1e-6)
    assert adv.ADVANTAGE_ESTIMATORS[method] is not None


@pytest.mark.parametrize("method", sorted(HAND))
def test_zero_variance_groups_get_zero_advantage_and_are_counted(method):
    rewards = jnp.asarray([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], jnp.float32)
    got = np.asarray(adv.group_advantages(rewards, 3, method, std_floor=1e-6))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[:3], 0.0)
    np.testing.assert_array_equal(got[6:], 0.0)
    assert np.abs(got[3:6]).sum() > 0
    np.testing.assert_allclose(adv.zero_variance_fraction(rewards, 3), 2 / 3)


def test_group_advantages_reject_bad_groupings():
    with pytest.raises(ValueError, match="whole number of groups"):
        adv.group_advantages(jnp.zeros(5), 3)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        adv.group_advantages(jnp.zeros(4), 1)
    with pytest.raises(ValueError, match="Unknown advantage estimator"):
        adv.group_advantages(jnp.zeros(4), 2, "ppo")


def test_group_advantages_broadcast_to_completion_tokens():
    loss_mask = np.zeros((6, 5), bool)
    loss_mask[:, 2:4] = True
    loss_mask[1, 4] = True
    got = np.asarray(adv.broadcast_to_tokens(adv.group_advantages(REWARDS, 3, "rloo"), loss_mask))
    want = np.where(loss_mask, np.asarray(HAND["rloo"])[:, None], 0.0)
    np.testing.assert_allclose(got, want, atol=1e-6)


# --- KL --------------------------------------------------------------------------


def test_kl_estimators_match_hand_values():
    logp = jnp.asarray([-1.0, -2.0, -0.5])
    ref = jnp.asarray([-2.0, -1.0, -0.5])
    np.testing.assert_allclose(kl.kl_estimate(logp, ref, "k1"), [1.0, -1.0, 0.0])
    np.testing.assert_allclose(kl.kl_estimate(logp, ref, "k2"), [0.5, 0.5, 0.0])
    # k3 = exp(ref - logp) - (ref - logp) - 1
    np.testing.assert_allclose(
        kl.kl_estimate(logp, ref, "k3"), [np.exp(-1.0), np.exp(1.0) - 2.0, 0.0], rtol=1e-6
    )


def test_kl_estimator_properties_and_clamp():
    rng = np.random.default_rng(4)
    logp = jnp.asarray(rng.normal(size=1000) * 3, jnp.float32)
    ref = jnp.asarray(rng.normal(size=1000) * 3, jnp.float32)
    assert (kl.kl_estimate(logp, ref, "k2") >= 0).all()
    assert (kl.kl_estimate(logp, ref, "k3") >= 0).all()
    for name in kl.KL_ESTIMATORS:
        np.testing.assert_array_equal(kl.kl_estimate(logp, logp, name), 0.0)
        assert kl.kl_estimate(logp, ref, name).dtype == jnp.float32
    # Far-apart or infinite log-probs stay finite: the log-ratio is clamped to +-20.
    extreme = kl.kl_estimate(jnp.asarray([0.0, -1e4]), jnp.asarray([-jnp.inf, 0.0]), "k3")
    np.testing.assert_allclose(extreme, [np.exp(-20.0) + 19.0, np.exp(20.0) - 21.0], rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown KL estimator"):
        kl.kl_estimate(logp, ref, "k4")


def test_all_kl_estimates_are_masked_means():
    logp = jnp.asarray([[-1.0, -2.0, 9.0]])
    ref = jnp.asarray([[-2.0, -1.0, -9.0]])
    mask = jnp.asarray([[True, True, False]])
    got = kl.all_kl_estimates(logp, ref, mask)
    np.testing.assert_allclose(got["kl_k1"], 0.0, atol=1e-7)
    np.testing.assert_allclose(got["kl_k2"], 0.5)
    np.testing.assert_allclose(got["kl_k3"], (np.exp(-1.0) + np.exp(1.0) - 2.0) / 2, rtol=1e-6)


def test_adaptive_kl_controller_moves_toward_target():
    # Above target the coefficient rises, below it falls, by at most 20% x steps/horizon.
    up = kl.adaptive_kl_update(0.1, observed_kl=10.0, num_steps=64, target=1.0, horizon=640)
    np.testing.assert_allclose(up, 0.1 * (1 + 0.2 * 0.1), rtol=1e-6)
    down = kl.adaptive_kl_update(0.1, observed_kl=0.9, num_steps=64, target=1.0, horizon=640)
    np.testing.assert_allclose(down, 0.1 * (1 - 0.1 * 0.1), rtol=1e-6)
    # A fixed controller when there is no target.
    for target in (None, 0.0):
        assert float(kl.adaptive_kl_update(0.05, 3.0, 64, target, 100)) == np.float32(0.05)
    # Closed loop: a KL inversely proportional to the coefficient settles at the target.
    coef = 0.01
    for _ in range(200):
        coef = kl.adaptive_kl_update(coef, 0.01 / coef, num_steps=1, target=0.1, horizon=2)
    np.testing.assert_allclose(0.01 / coef, 0.1, rtol=1e-3)


def test_token_rewards_pay_the_kl_on_valid_tokens():
    scores = jnp.asarray([[0.0, 0.0, 1.0, 4.0]])
    logp = jnp.asarray([[0.0, -1.0, -1.0, -1.0]])
    ref = jnp.asarray([[0.0, -1.5, -2.0, -1.0]])
    mask = jnp.asarray([[False, True, True, False]])
    got = kl.token_rewards_with_kl(scores, logp, ref, mask, kl_coef=0.05)
    np.testing.assert_allclose(got, [[0.0, -0.05 * 0.5, 1.0 - 0.05 * 1.0, 0.0]], rtol=1e-6)

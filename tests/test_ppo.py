"""PPO: ratio == 1 before the first update, the REINFORCE gradient, clipping,
micro-batches, sharded == single-device update, a separate critic, learning."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rl_reason.algorithms import advantages as adv
from rl_reason.algorithms import grpo, kl, ppo
from rl_reason.algorithms import train_state as ts
from rl_reason.algorithms.logprobs import (
    SharedPrompts,
    chunked_target_logprobs,
    chunked_target_scores,
    score_tokens,
)
from rl_reason.experiments import rollout
from rl_reason.models.config import tiny_llama
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd

CHUNK = 4
RULES = shd.DEFAULT_RULES


def _model_config(**changes):
    base = dict(
        vocab_size=64, hidden_dim=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
        mlp_dim=64,
    )  # fmt: skip
    return tiny_llama(**{**base, **changes})


POLICY = Transformer(_model_config(heads=("value",)))
MODELS = ppo.ActorCritic(POLICY)  # the value head on the policy's trunk
SGD = optax.sgd(0.1)  # parameters move by the gradient itself: comparisons stay tight
LR = optax.constant_schedule(0.1)

# These tests compile far more than they run; LLVM at -O0 halves XLA:CPU's
# compile time. Programs built by train_state.jit_step keep the default.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _fast_jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def _mesh(shape):
    return mesh_lib.make_mesh(shape, devices=jax.devices()[: int(np.prod(shape))])


def _rollout(vocab, rows=8, prompt_len=4, gen_len=6, seed=0):
    """Rollout.sequences()'s layout: left-padded prompts, 1..gen_len completion tokens, padding."""
    rng = np.random.default_rng(seed)
    input_mask = np.zeros((rows, prompt_len + gen_len), bool)
    loss_mask = np.zeros_like(input_mask)
    for r in range(rows):
        p, g = rng.integers(1, prompt_len + 1), rng.integers(1, gen_len + 1)
        input_mask[r, prompt_len - p : prompt_len + g] = True
        loss_mask[r, prompt_len : prompt_len + g] = True
    tokens = np.where(input_mask, rng.integers(3, vocab, input_mask.shape), 0).astype(np.int32)
    return {"tokens": tokens, "input_mask": input_mask, "loss_mask": loss_mask}


def _grouped_rollout(k, prompt_len, groups=4):
    """_rollout's layout where each K consecutive rows hold one prompt (a rollout's K
    samples of it) in their first prompt_len columns."""
    seqs = _rollout(POLICY.config.vocab_size, rows=groups * k, prompt_len=prompt_len, gen_len=5)
    for name in ("tokens", "input_mask"):
        seqs[name][:, :prompt_len] = np.repeat(seqs[name][::k, :prompt_len], k, axis=0)
    return seqs


def _jit_score(models):
    return _fast_jit(functools.partial(ppo.score, models, chunk_size=CHUNK))


SCORE = _jit_score(MODELS)  # one compiled program, shared by the tests below


@pytest.fixture(scope="module")
def initial_state():
    """The state every update below starts from: create_ppo_state with seed 0, on the host."""
    return jax.device_get(ppo.create_ppo_state(MODELS, SGD, _mesh((1, 1, 1)), RULES, seed=0))


@pytest.fixture(scope="module")
def params(initial_state):
    return initial_state.params


@pytest.fixture(scope="module")
def batch(params):
    """A PPO batch built as the loop builds it: score, KL-paying rewards, GAE."""
    seqs = _rollout(POLICY.config.vocab_size)
    ref_params = jax.tree.map(lambda x: x * 1.05, params)  # a reference that differs a little
    scored = SCORE(params, ref_params, seqs)
    valid = seqs["loss_mask"]
    last = valid & ~np.pad(valid[:, 1:], ((0, 0), (0, 1)))  # the final completion token
    outcome = np.random.default_rng(1).integers(0, 2, (valid.shape[0], 1)).astype(np.float32)
    rewards = kl.token_rewards_with_kl(
        jnp.asarray(last * outcome), scored["old_logprobs"], scored["ref_logprobs"], valid, 0.05
    )
    advantages, returns = adv.gae(rewards, scored["old_values"], valid, 1.0, 0.95)
    out = {**seqs, **scored, "advantages": advantages, "returns": returns}
    return jax.device_get(out)


def _assert_trees_close(a, b, atol, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


# --- chunked entropy -------------------------------------------------------------


def test_chunked_entropy_equals_full_softmax_entropy():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 11, 8)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (3, 11)), jnp.int32)
    chunk = 4  # three chunks, the last one padded

    @_fast_jit
    def both_ways(table):
        chunked_entropy = lambda t: chunked_target_scores(
            lambda h: h @ t.T, hidden, targets, chunk, with_entropy=True
        )[2]
        full_entropy = lambda t: (
            -(jax.nn.softmax(hidden @ t.T) * jax.nn.log_softmax(hidden @ t.T)).sum(-1)
        )
        return (
            chunked_target_scores(lambda h: h @ table.T, hidden, targets, chunk, True),
            chunked_target_logprobs(lambda h: h @ table.T, hidden, targets, chunk),
            full_entropy(table),
            # The gradient through the checkpointed chunks is the plain entropy gradient.
            (
                jax.grad(lambda t: chunked_entropy(t).sum())(table),
                jax.grad(lambda t: full_entropy(t).sum())(table),
            ),
        )

    (logprobs, hits, got), plain, want, (g_chunk, g_full) = both_ways(table)
    np.testing.assert_allclose(got, want, atol=1e-5)
    full = jax.nn.log_softmax(hidden @ table.T)
    target_logprobs = jnp.take_along_axis(full, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(logprobs, target_logprobs, atol=1e-5)
    np.testing.assert_array_equal(logprobs, plain[0])
    np.testing.assert_array_equal(hits, plain[1])
    np.testing.assert_allclose(g_chunk, g_full, atol=1e-4)


def test_chunks_with_no_needed_position_are_skipped_exactly_and_keep_no_logits():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 12, 8)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (3, 12)), jnp.int32)
    needed = np.zeros((3, 12), bool)
    needed[0, 9:] = needed[2, 5:] = True  # chunks of 4: the first is never needed

    def loss(table, skip):
        logprobs, _, entropy = chunked_target_scores(
            lambda h: h @ table.T, hidden, targets, 4, True, needed if skip else None
        )
        return jnp.where(needed, logprobs + 0.1 * entropy, 0.0).sum(), (logprobs, entropy)

    grad = lambda skip: jax.grad(loss, has_aux=True)(table, skip)
    (g_all, (lp_all, h_all)), (g_skip, (lp_skip, h_skip)) = _fast_jit(
        lambda: (grad(False), grad(True))
    )()
    np.testing.assert_array_equal(lp_skip[:, 4:], lp_all[:, 4:])  # computed as without it
    np.testing.assert_array_equal(h_skip[:, 4:], h_all[:, 4:])
    assert not lp_skip[:, :4].any() and not h_skip[:, :4].any()  # the skipped chunk
    np.testing.assert_allclose(g_skip, g_all, rtol=1e-6, atol=1e-7)
    # The backward pass keeps each chunk's inputs only, with or without skipping.
    temp = lambda skip: (
        jax.jit(functools.partial(grad, skip))
        .lower()
        .compile()
        .memory_analysis()
        .temp_size_in_bytes
    )
    assert temp(True) <= temp(False) + 4096


# --- score ------------------------------------------------------------------------


def test_score_aligns_values_masks_and_takes_a_headless_reference(params, batch):
    seqs = {k: batch[k] for k in ("tokens", "input_mask", "loss_mask")}
    valid = seqs["loss_mask"]
    forward = functools.partial(score_tokens, POLICY, chunk_size=CHUNK)
    scored = _fast_jit(forward)(params, seqs["tokens"], seqs["input_mask"])
    want = np.where(valid, scored.logprobs, 0)
    np.testing.assert_allclose(batch["old_logprobs"], want, atol=1e-6)
    # The value of the state token t was chosen in is the head at t - 1.
    head = np.asarray(scored.heads["value"])
    np.testing.assert_allclose(
        batch["old_values"][:, 1:], np.where(valid[:, 1:], head[:, :-1], 0), atol=1e-6
    )
    assert not batch["old_logprobs"][~valid].any() and not batch["old_values"][~valid].any()
    # Same params as reference: zero KL.
    same = SCORE(params, params, seqs)
    np.testing.assert_allclose(same["ref_logprobs"], same["old_logprobs"], atol=1e-6)
    # A reference checkpoint without the value head (an SFT one) is accepted;
    # no reference, no ref_logprobs.
    headless = {"params": {k: v for k, v in params["params"].items() if k != "scalar_heads_value"}}
    shapes = jax.eval_shape(SCORE, params, headless, seqs)
    assert shapes["ref_logprobs"].shape == valid.shape
    assert "ref_logprobs" not in jax.eval_shape(SCORE, params, None, seqs)


# --- the loss before the first update ---------------------------------------------------


FIRST_STEP = ppo.PPOConfig(chunk_size=CHUNK, vf_coef=0.5, entropy_coef=0.01, kl_loss_coef=0.1)


@_fast_jit
def _first_step_loss_and_grads(params, batch):
    loss = lambda p: ppo.ppo_loss(p, batch, MODELS, FIRST_STEP, ppo.loss_normalizers(batch))
    return jax.value_and_grad(loss, has_aux=True)(params)


def test_ratio_is_one_and_the_gradient_is_reinforce_before_the_first_update(params, batch):
    (_, aux), grads = _first_step_loss_and_grads(params, batch)
    assert float(aux["max"]["log_ratio_abs_max"]) < 1e-6
    assert abs(float(aux["max"]["ratio_max"]) - 1) < 1e-6
    assert abs(float(aux["mean"]["ratio_mean"]) - 1) < 1e-6
    assert float(aux["mean"]["clip_fraction"]) == 0.0
    assert float(aux["mean"]["value_clip_fraction"]) == 0.0
    assert abs(float(aux["mean"]["approx_kl"])) < 1e-10
    # The clipped surrogate is the unclipped one, -sum(r A) with r = 1.
    valid = batch["loss_mask"].astype(np.float32)
    token_mean = valid / valid.sum()
    advantages = batch["advantages"]
    np.testing.assert_allclose(
        aux["mean"]["policy_loss"], -(token_mean * advantages).sum(), atol=1e-6
    )

    def reinforce_and_regression(p):
        """REINFORCE + value regression + entropy bonus + KL loss, written out by hand."""
        scored = score_tokens(
            POLICY, p, batch["tokens"], batch["input_mask"], chunk_size=CHUNK, with_entropy=True
        )
        values = jnp.pad(scored.heads["value"][:, :-1], ((0, 0), (1, 0)))
        reinforce = -(token_mean * advantages * scored.logprobs).sum()
        regression = (token_mean * 0.5 * jnp.square(values - batch["returns"])).sum()
        entropy = (token_mean * scored.entropy).sum()
        kl_loss = (token_mean * kl.kl_estimate(scored.logprobs, batch["ref_logprobs"], "k3")).sum()
        return reinforce + 0.5 * regression - 0.01 * entropy + 0.1 * kl_loss

    want = _fast_jit(jax.grad(reinforce_and_regression))(params)
    _assert_trees_close(grads, want, atol=1e-7, rtol=1e-4)
    assert np.abs(want["params"]["embedder"]["embedding"]).max() > 1e-5
    assert np.abs(want["params"]["scalar_heads_value"]["kernel"]).max() > 1e-5


def _hand_aggregation(valid, how):
    valid = valid.astype(np.float32)
    rows = valid.any(axis=1).sum()
    if how == "token_mean":
        return valid / valid.sum()
    if how == "seq_mean_token_mean":
        return valid / np.maximum(valid.sum(axis=1, keepdims=True), 1) / rows
    return valid / (valid.shape[1] * rows)


@pytest.mark.parametrize("aggregation", ppo.LOSS_AGGREGATIONS)
def test_loss_aggregation_weights(batch, aggregation):
    config = ppo.PPOConfig(loss_aggregation=aggregation)
    valid = jnp.asarray(batch["loss_mask"])
    full = ppo.aggregation_weights(valid, ppo.loss_normalizers(batch), config)
    np.testing.assert_allclose(full, _hand_aggregation(batch["loss_mask"], aggregation), rtol=1e-6)
    # Micro-batches weighed with the full batch's normalizers add up to the full weights.
    normalizers = ppo.loss_normalizers(batch)
    halves = [ppo.aggregation_weights(valid[i::2], normalizers, config).sum() for i in (0, 1)]
    np.testing.assert_allclose(sum(halves), full.sum(), rtol=1e-6)


# --- clipping ----------------------------------------------------------------------


def test_policy_clipping_hand_values():
    ratio = jnp.asarray([1.5, 0.5, 0.5, 1.5, 1.1])
    advantages = jnp.asarray([1.0, 1.0, -1.0, -1.0, 2.0])
    loss, clipped = ppo.clipped_policy_loss(ratio, advantages, 0.2)
    # -min(rA, clip(r)A): 1.5 -> 1.2 caps a gain; 0.5 with A > 0 is not clipped (pessimism).
    np.testing.assert_allclose(loss, [-1.2, -0.5, 0.8, 1.5, -2.2], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [True, False, True, False, False])


def test_value_clipping_hand_values():
    values = jnp.asarray([0.1, 0.5, 0.5])
    old = jnp.asarray([0.0, 0.0, 0.0])
    returns = jnp.asarray([1.0, -1.0, 1.0])
    loss, clipped = ppo.clipped_value_loss(values, old, returns, 0.2)
    # 0: inside the band, both terms .81.
    # 1: moved .5 away from R = -1: (V - R)^2 = 2.25 beats clip(V) = .2's 1.44.
    # 2: moved .5 toward R = 1: (V - R)^2 = .25, but clip(V) = .2 gives .64: the clipped term wins.
    np.testing.assert_allclose(loss, [0.5 * 0.81, 0.5 * 2.25, 0.5 * 0.64], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [False, False, True])
    loss, clipped = ppo.clipped_value_loss(values, old, returns, 0.0)  # no clipping
    np.testing.assert_allclose(loss, [0.5 * 0.81, 0.5 * 2.25, 0.5 * 0.25], rtol=1e-6)
    assert not np.asarray(clipped).any()


def test_clipped_value_term_stops_the_value_gradient(params, batch):
    valid = batch["loss_mask"]
    moved = dict(batch)
    # The value has moved 1 past its rollout value, away from a return 1 ahead of it.
    moved["old_values"] = np.where(valid, batch["old_values"] - 1.0, 0.0)
    moved["returns"] = np.where(valid, batch["old_values"] + 1.0, 0.0)
    moved["advantages"] = np.zeros_like(batch["advantages"])  # no policy gradient
    (_, aux), grads = _first_step_loss_and_grads(params, moved)
    # clip(V, Vold +- .2) = V - .8 is 1.8 from the return: that term wins, 0.5 * 1.8^2.
    np.testing.assert_allclose(aux["mean"]["value_loss"], 0.5 * 1.8**2, rtol=1e-4)
    np.testing.assert_allclose(aux["mean"]["value_clip_fraction"], 1.0, rtol=1e-6)
    # ... and it is flat in V: the value head gets no gradient at all (the
    # trunk still gets the entropy and KL terms').
    head = grads["params"]["scalar_heads_value"]
    assert not np.asarray(head["kernel"]).any() and not np.asarray(head["bias"]).any()


# --- the update ----------------------------------------------------------------------

UPDATE = ppo.PPOConfig(
    chunk_size=CHUNK, num_epochs=2, num_minibatches=2, entropy_coef=0.01, kl_loss_coef=0.1
)


def _update_on_one_device(state, batch, config):
    update = _fast_jit(ppo.make_ppo_update(MODELS, SGD, config, lr_schedule=LR))
    return jax.device_get(update(state, batch))


def _update_on_mesh(batch, mesh_shape, config):
    """As the loop runs it: state in its shardings, train_state.jit_step, a sharded batch."""
    mesh = _mesh(mesh_shape)
    state = ppo.create_ppo_state(MODELS, SGD, mesh, RULES, seed=0)
    update = ts.jit_step(
        ppo.make_ppo_update(MODELS, SGD, config, lr_schedule=LR),
        mesh,
        RULES,
        ppo.ppo_state_shardings(MODELS, SGD, mesh, RULES),
    )
    return jax.device_get(update(state, shd.shard_batch(batch, mesh)))


@pytest.fixture(scope="module")
def reference_update(initial_state, batch):
    return _update_on_one_device(initial_state, batch, UPDATE)


def test_token_span_keeps_every_token_column_in_a_multiple_of_the_width():
    mask = np.zeros((3, 12), bool)
    mask[0, 5:9], mask[1, 6:10], mask[2, 7:8] = True, True, True  # tokens in columns 5..9
    assert rollout.token_span(mask, 1) == slice(5, 10)
    assert rollout.token_span(mask, 4) == slice(2, 10)  # widened into the prompt padding
    assert rollout.token_span(mask, 8) == slice(2, 10)
    assert rollout.token_span(mask, 16) == slice(0, 12)  # never wider than the rollout
    assert rollout.token_span(mask, 0) == slice(0, 12)  # 0: every column
    mask[:, :2] = True  # a width of 10 columns: widened to 12, the whole rollout
    assert rollout.token_span(mask, 4) == slice(0, 12)
    assert rollout.token_span(np.zeros((2, 6), bool), 4) == slice(0, 6)


def test_cutting_the_padding_columns_changes_no_score_and_no_update(params, initial_state, batch):
    """What the on-policy learner does with `rl.pad_to_multiple`: the rollout's columns
    that hold no token of any row are left out of scoring and the update."""
    seqs = {k: batch[k] for k in ("tokens", "input_mask", "loss_mask")}
    wide = {k: np.pad(v, ((0, 0), (3, 5))) for k, v in seqs.items()}  # bucket and budget padding
    span = rollout.token_span(wide["input_mask"], 2)
    assert span.stop - span.start < wide["tokens"].shape[1]
    cut = {k: v[:, span] for k, v in wide.items()}
    ref_params = jax.tree.map(lambda x: x * 1.05, params)
    full, part = SCORE(params, ref_params, wide), SCORE(params, ref_params, cut)
    for name in full:
        np.testing.assert_allclose(part[name], full[name][:, span], atol=1e-6)
        outside = np.delete(np.asarray(full[name]), np.arange(span.start, span.stop), axis=1)
        assert not outside.any(), name

    def update_on(sequences, scored):
        valid = sequences["loss_mask"]
        last = valid & ~np.pad(valid[:, 1:], ((0, 0), (0, 1)))
        rewards = kl.token_rewards_with_kl(
            jnp.asarray(last * 1.0), scored["old_logprobs"], scored["ref_logprobs"], valid, 0.05
        )
        advantages, returns = adv.gae(rewards, scored["old_values"], valid, 1.0, 0.95)
        step = {**sequences, **scored, "advantages": advantages, "returns": returns}
        return _update_on_one_device(initial_state, step, UPDATE)

    state_full, metrics_full = update_on(wide, full)
    state_cut, metrics_cut = update_on(cut, part)
    _assert_trees_close(state_cut.params, state_full.params, atol=1e-6)
    _assert_trees_close(metrics_cut, metrics_full, atol=1e-5)


@pytest.mark.parametrize("with_policy", [True, False])
def test_scoring_a_shared_prompt_once_per_group_gives_the_same_scores(params, with_policy):
    """Scoring with SharedPrompts (the K samples' prompt columns run once a group, each
    row's own columns reading their keys) is the forward over whole rows, to rounding."""
    k, prompt_len = 3, 6
    seqs = _grouped_rollout(k, prompt_len)
    ref_params = jax.tree.map(lambda x: x * 1.05, params)
    score = jax.jit(
        functools.partial(ppo.score, MODELS, chunk_size=CHUNK, with_policy=with_policy),
        static_argnames="shared",
        compiler_options=FAST_COMPILE,
    )
    whole = score(params, ref_params, seqs)
    for columns in (1, prompt_len - 1):
        once = score(params, ref_params, seqs, shared=SharedPrompts(columns, k))
        assert once.keys() == whole.keys()
        _assert_trees_close(once, whole, atol=2e-6)


def test_shared_prompts_are_found_only_where_each_group_holds_one_prompt():
    """SharedPrompts.find: the prompt columns but the last, to a multiple; None where a
    group's rows differ there, for K = 1, or when no whole multiple is left."""
    k, prompt_len = 3, 10
    seqs = _grouped_rollout(k, prompt_len)
    tokens, mask = seqs["tokens"], seqs["input_mask"]
    assert SharedPrompts.find(tokens, mask, k, prompt_len, 4) == SharedPrompts(8, k)
    assert SharedPrompts.find(tokens, mask, k, prompt_len, 1) == SharedPrompts(9, k)
    assert SharedPrompts.find(tokens, mask, k, prompt_len, 16) is None  # 9 columns < 16
    assert SharedPrompts.find(tokens, mask, 1, prompt_len, 1) is None
    assert SharedPrompts.find(tokens[1:], mask[1:], k, prompt_len, 1) is None  # not groups of K
    tokens = tokens.copy()
    tokens[k + 1, 8] += 1  # a row of the second group differs in a shared column
    assert SharedPrompts.find(tokens, mask, k, prompt_len, 1) is None
    assert SharedPrompts.find(tokens, mask, k, prompt_len, 4) == SharedPrompts(8, k)


@pytest.mark.parametrize("num_microbatches", [1, 3])
def test_the_update_running_each_prompt_once_is_the_update_over_whole_rows(
    initial_state, params, num_microbatches
):
    """ppo_update with SharedPrompts: each shuffled micro-batch runs the prompts of its
    rows once (1 micro-batch: 6 rows of up to 4 prompts; 3: 2 rows, one prompt or two),
    forward and backward; the same steps as over whole rows, to rounding."""
    k, prompt_len = 3, 6
    seqs = _grouped_rollout(k, prompt_len)
    ref_params = jax.tree.map(lambda x: x * 1.05, params)
    scored = SCORE(params, ref_params, seqs)
    advantages = np.random.default_rng(2).normal(size=seqs["tokens"].shape).astype(np.float32)
    returns = scored["old_values"] + advantages
    batch = jax.device_get({**seqs, **scored, "advantages": advantages, "returns": returns})
    config = dataclasses.replace(UPDATE, num_microbatches=num_microbatches)
    whole = _update_on_one_device(initial_state, batch, config)
    update = ppo.make_ppo_update(
        MODELS, SGD, config, lr_schedule=LR, shared=SharedPrompts(prompt_len - 1, k)
    )
    once = jax.device_get(_fast_jit(update)(initial_state, batch))
    _assert_trees_close(once[0].params, whole[0].params, atol=2e-6)
    _assert_trees_close(once[1], whole[1], atol=1e-5)


def test_update_counts_steps_and_reports_finite_metrics(reference_update, params):
    state, metrics = reference_update
    assert int(state.step) == UPDATE.num_epochs * UPDATE.num_minibatches
    assert metrics["finite"] == 1.0
    for name in (
        "loss", "policy_loss", "value_loss", "entropy", "kl_loss", "approx_kl", "clip_fraction",
        "ratio_mean", "ratio_max", "grad_norm", "lr", "explained_variance",
        "nonzero_advantage_fraction",
    ):  # fmt: skip
        assert np.isfinite(metrics[name]), name
    np.testing.assert_allclose(metrics["lr"], 0.1)
    assert metrics["ratio_max"] > 1.0  # the second epoch sees a moved policy
    for new, old in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        assert np.abs(new - old).max() > 0


def test_clip_higher_with_equal_ranges_is_todays_update_bitwise(
    initial_state, batch, reference_update
):
    """DAPO's clip-higher set to the lower range is the symmetric clip, bit for bit."""
    same = dataclasses.replace(UPDATE, clip_eps_high=UPDATE.clip_eps)
    state, metrics = _update_on_one_device(initial_state, batch, same)
    for x, y in zip(jax.tree.leaves((state, metrics)), jax.tree.leaves(reference_update)):
        np.testing.assert_array_equal(x, y)


def test_sharded_update_equals_single_device_update(batch, reference_update):
    one, m_one = reference_update
    sharded, m_sharded = _update_on_mesh(batch, (2, 2, 2), UPDATE)
    _assert_trees_close(sharded.params, one.params, atol=1e-5)
    for name in m_one:
        np.testing.assert_allclose(m_sharded[name], m_one[name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(sharded.rng, one.rng)


def test_micro_batches_equal_one_batch(initial_state, batch, reference_update):
    """Two micro-batches == one; and whitening inside == advantages whitened before.

    (One compiled program checks both, to keep the file fast.)
    """
    one, m_one = reference_update
    whitened = np.asarray(adv.whiten(batch["advantages"], batch["loss_mask"]))
    prewhitened = dict(batch, advantages=whitened)
    config = dataclasses.replace(UPDATE, num_microbatches=2, whiten_advantages=False)
    micro, m_micro = _update_on_one_device(initial_state, prewhitened, config)
    _assert_trees_close(micro.params, one.params, atol=1e-6)
    for name in ("loss", "policy_loss", "value_loss", "grad_norm", "ratio_max", "clip_fraction"):
        np.testing.assert_allclose(m_micro[name], m_one[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_single_step_update_needs_no_rollout_logprobs(initial_state, params, batch):
    """score(with_policy=False) skips the policy's log-probs; the single-step update takes
    its ratio against its own (exactly 1) and logs the rollout's KL to the reference."""
    ref_params = jax.tree.map(lambda x: x * 1.05, params)
    seqs = {k: batch[k] for k in ("tokens", "input_mask", "loss_mask")}
    full = SCORE(params, ref_params, seqs)
    light = _fast_jit(functools.partial(ppo.score, MODELS, chunk_size=CHUNK, with_policy=False))
    light = light(params, ref_params, seqs)
    assert "old_logprobs" not in light
    np.testing.assert_array_equal(light["ref_logprobs"], full["ref_logprobs"])
    np.testing.assert_allclose(light["old_values"], full["old_values"], atol=1e-6)

    config = dataclasses.replace(UPDATE, num_epochs=1, num_minibatches=1, num_microbatches=2)
    assert ppo.single_step(config) and not ppo.single_step(UPDATE)
    rest = {k: v for k, v in batch.items() if k not in full}  # advantages, returns
    with_old = _update_on_one_device(initial_state, {**rest, **seqs, **full}, config)
    without = _update_on_one_device(initial_state, {**rest, **seqs, **light}, config)
    _assert_trees_close(without[0].params, with_old[0].params, atol=1e-6)
    assert without[1]["ratio_max"] == 1.0 and without[1]["approx_kl"] == 0.0
    valid = jnp.asarray(batch["loss_mask"]).at[:, 0].set(False)
    for name, value in kl.all_kl_estimates(
        full["old_logprobs"], full["ref_logprobs"], valid
    ).items():
        np.testing.assert_allclose(without[1][name], value, rtol=1e-4, atol=1e-7, err_msg=name)
    assert "kl_k1" not in with_old[1]  # the loop logs it from the scored batch then
    with pytest.raises(ValueError, match="old_logprobs"):
        _update_on_one_device(initial_state, {**rest, **seqs, **light}, UPDATE)


def test_separate_critic_is_trained_with_the_policy():
    models = ppo.ActorCritic(
        policy=Transformer(_model_config(num_layers=1)),
        critic=Transformer(_model_config(num_layers=1, heads=("value",))),
    )
    # On the mesh: one state, its params {"policy", "critic"}, each sharded by its own names.
    mesh = _mesh((2, 2, 2))
    abstract = ppo.abstract_ppo_state(models, SGD, mesh, RULES)
    assert set(abstract.params) == {"policy", "critic"}
    embedding = abstract.params["critic"]["params"]["embedder"]["embedding"]
    assert embedding.sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
    # The update runs on one device (a sharded update is test_sharded_update_...'s business).
    state = jax.device_get(ppo.create_ppo_state(models, SGD, _mesh((1, 1, 1)), RULES, seed=0))
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, state)
    seqs = _rollout(models.policy.config.vocab_size, seed=3)
    scored = jax.eval_shape(_jit_score(models), state.params, state.params["policy"], seqs)
    assert scored["old_values"].shape == seqs["tokens"].shape
    # An off-policy batch (old log-probs 0) is enough to see both parts move.
    valid = seqs["loss_mask"]
    advantages = np.where(valid, np.random.default_rng(4).normal(size=valid.shape), 0)
    zeros = np.zeros(valid.shape, np.float32)
    batch = {
        **seqs,
        "old_logprobs": zeros,
        "old_values": zeros,
        "advantages": advantages.astype(np.float32),
        "returns": valid.astype(np.float32),
    }
    update = _fast_jit(ppo.make_ppo_update(models, SGD, ppo.PPOConfig(chunk_size=CHUNK)))
    after, metrics = jax.device_get(update(state, batch))
    for part in ("policy", "critic"):
        leaves = zip(jax.tree.leaves(after.params[part]), jax.tree.leaves(state.params[part]))
        assert max(np.abs(a - b).max() for a, b in leaves) > 0, part
    assert metrics["finite"] == 1.0 and metrics["value_loss"] > 0 and int(after.step) == 1


def test_grpo_update_raises_the_logprob_of_the_rewarded_token():
    """A bandit: after prompt token 1, answer 2 is rewarded and answer 3 is not."""
    models = ppo.ActorCritic(Transformer(_model_config(vocab_size=8, num_layers=1)))
    answers = np.array([2, 3, 2, 3, 2, 3, 2, 3], np.int32)
    seqs = {
        "tokens": np.stack([np.ones_like(answers), answers], axis=1),
        "input_mask": np.ones((8, 2), bool),
        "loss_mask": np.array([[False, True]] * 8),
    }
    rewards = (answers == 2).astype(np.float32)
    advantages = grpo.group_token_advantages(rewards, seqs["loss_mask"], num_samples=8)
    config = grpo.grpo_ppo_config(kl_loss_coef=0.0, num_epochs=2, chunk_size=2)
    tx = optax.adam(1e-2)
    init = _fast_jit(models.policy.init)
    params = nn.meta.unbox(init(jax.random.PRNGKey(0), seqs["tokens"], seqs["tokens"]))
    state = ts.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(1),
    )
    update = _fast_jit(ppo.make_ppo_update(models, tx, config))
    score = _jit_score(models)
    history = []
    for _ in range(4):
        scored = score(state.params, None, seqs)
        history.append(np.asarray(scored["old_logprobs"][:2, 1]))  # log p(2 | 1), log p(3 | 1)
        state, metrics = update(state, {**seqs, **scored, "advantages": advantages})
        assert metrics["finite"] == 1.0
    assert history[-1][0] > history[0][0] + 0.1
    assert history[-1][1] < history[0][1] - 0.1


# --- configs ---------------------------------------------------------------------------


def test_group_presets():
    config = grpo.grpo_ppo_config(num_epochs=2)
    assert not config.use_value and config.vf_coef == 0 and config.kl_loss_coef == 0.04
    assert config.kl_estimator == "k3" and not config.whiten_advantages and config.num_epochs == 2
    assert grpo.dr_grpo_ppo_config().loss_aggregation == "seq_mean_token_sum_norm"


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(clip_eps=0.0), "clip_eps"),
        (dict(num_minibatches=0), "num_minibatches"),
        (dict(loss_aggregation="sum"), "loss_aggregation"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(use_value=False), "vf_coef"),
        (dict(policy_loss="trpo"), "policy_loss"),
        (dict(clip_eps_high=-0.1), "clip_eps_high"),
    ],
)
def test_invalid_configs_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        ppo.PPOConfig(**changes)


def test_missing_batch_keys_are_clear_errors(initial_state, params, batch):
    update = functools.partial(ppo.ppo_update, initial_state, models=MODELS, tx=SGD)
    without_returns = {k: v for k, v in batch.items() if k != "returns"}
    with pytest.raises(ValueError, match="returns"):
        update(without_returns, config=UPDATE)
    with pytest.raises(ValueError, match="num_minibatches=3"):
        update(batch, config=dataclasses.replace(UPDATE, num_minibatches=3))
    headless = ppo.ActorCritic(Transformer(_model_config()))
    with pytest.raises(ValueError, match="'value' head"):
        ppo.values(headless, params, batch["tokens"], batch["input_mask"])

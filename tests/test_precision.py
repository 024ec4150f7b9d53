"""Mixed precision: float32 defaults unchanged bit for bit, bfloat16 training within a stated
tolerance of float32, and a sampler whose precision is chosen apart from the learner's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rl_reason.algorithms import rollout_correction as rc
from rl_reason.algorithms.logprobs import token_logprobs
from rl_reason.algorithms.sft import sft_step
from rl_reason.algorithms.train_state import TrainState
from rl_reason.data import synthetic
from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.models import precision
from rl_reason.models.config import tiny_llama
from rl_reason.models.transformer import KVCache, Transformer, default_positions
from rl_reason.sampling.engine import Sampler

VOCAB = 64


def _params(config, seed=0):
    tokens = jnp.zeros((1, 2), jnp.int32)
    return nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(seed), tokens, tokens))


def _logits(config, params, tokens):
    model = Transformer(config)
    mask = jnp.ones(tokens.shape, bool)
    out = model.apply(params, tokens, default_positions(mask), mask)
    return model.apply(params, out.hidden, method=Transformer.logits)


def test_lm_head_fp32_is_a_no_op_in_float32_and_helps_in_bfloat16():
    config = tiny_llama(vocab_size=VOCAB, init_std=0.2)
    params = _params(config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 12)), jnp.int32)
    variants = [
        config,
        config.replace(lm_head_fp32=True),
        config.replace(dtype="bfloat16"),
        config.replace(dtype="bfloat16", lm_head_fp32=True),
    ]
    # one program for the four (each compile costs seconds on a loaded 2-core machine)
    f32, same, bf16, head32 = jax.jit(lambda p, t: [_logits(c, p, t) for c in variants])(
        params, tokens
    )
    assert np.asarray(f32).tobytes() == np.asarray(same).tobytes()
    assert bf16.dtype == head32.dtype == jnp.float32
    err = lambda x: float(jnp.abs(x - f32).mean())
    assert 0 < err(head32) < err(bf16)


def _counting_batch(rng, rows=8, length=24):
    """Rows that count up by a row-specific step: a pattern a tiny model learns in 50 steps."""
    start = rng.integers(0, VOCAB, (rows, 1))
    step = rng.integers(1, 4, (rows, 1))
    tokens = ((start + step * np.arange(length)) % VOCAB).astype(np.int32)
    mask = np.ones(tokens.shape, bool)
    return {"tokens": tokens, "input_mask": mask, "loss_mask": mask}


def _sft_losses(dtype, steps=50):
    config = tiny_llama(vocab_size=VOCAB, dtype=dtype)
    model = Transformer(config)
    tx = optax.adam(3e-3)
    params = _params(config)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))
    step = jax.jit(lambda s, b: sft_step(s, b, model=model, tx=tx, chunk_size=24))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, _counting_batch(rng))
        losses.append(float(metrics["loss"]))
    leaves = jax.tree.leaves((state.params, state.opt_state))
    return np.asarray(losses), {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}


def test_sft_in_bfloat16_compute_follows_float32():
    """50 SFT steps with bfloat16 compute and float32 masters track the float32 run:
    every step's loss within 5% of it (measured at most 0.16%), the same progress, and
    parameters and Adam moments stay float32."""
    f32, dtypes32 = _sft_losses("float32")
    bf16, dtypes16 = _sft_losses("bfloat16")
    assert dtypes32 == dtypes16 == {jnp.dtype(jnp.float32)}
    assert f32[-1] < 0.5 * f32[0]  # it learned
    np.testing.assert_allclose(bf16, f32, rtol=0.05)
    assert not np.array_equal(bf16, f32)  # bfloat16 really was computed


@pytest.fixture(scope="module")
def tokenizer():
    texts = [ex["question"] + "\n" + ex["answer"] for ex in synthetic.generate("train", 200)]
    return tokenizer_lib.train_tokenizer(texts, vocab_size=300)


def _mismatch(rollout, model, params):
    """mismatch_metrics of the rollout's log-probs against the learner's float32 ones."""
    seq = rollout.sequences()
    score = jax.jit(lambda p, t, m: token_logprobs(model, p, t, m, chunk_size=64))
    learner = score(params, seq["tokens"], seq["input_mask"])
    metrics = rc.mismatch_metrics(learner.logprobs, rollout.sequence_logprobs(), seq["loss_mask"])
    width = rollout.prompt_tokens.shape[1]  # the same on the completion alone
    alone = rc.mismatch_metrics(
        learner.logprobs[:, width:], rollout.logprobs, rollout.completion_mask
    )
    for k in metrics:
        np.testing.assert_allclose(float(alone[k]), float(metrics[k]), rtol=1e-6, err_msg=k)
    return metrics


def test_sampler_precision_apart_from_the_learners(tokenizer):
    """dtype=None or the learner's own: the same weights and bitwise the same rollout.
    dtype="bfloat16": a bfloat16 copy of the weights and a bfloat16 KV cache, the
    learner's float32 weights untouched, and log-probs a small, measured gap away."""
    config = tiny_llama(vocab_size=len(tokenizer), init_std=0.1)
    params = _params(config)
    make = lambda **kw: Sampler(
        config, tokenizer, batch_size=4, prompt_buckets=(64,), truncate_prompts=True, **kw
    )
    plain, same, bf16 = make(), make(dtype="float32"), make(dtype="bfloat16")
    assert same.sampling_params(params) is params and plain.sampling_params(params) is params
    copy = bf16.sampling_params(params)
    assert bf16.sampling_params(copy) is copy  # cast once, sample in chunks
    assert {x.dtype for x in jax.tree.leaves(copy)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert precision.tree_bytes(copy) * 2 == precision.tree_bytes(params)
    cache = jax.eval_shape(lambda: KVCache.init(bf16.model.config, 2, 16))
    assert cache.k[0].dtype == jnp.bfloat16 and cache.v[0].dtype == jnp.bfloat16
    assert precision.kv_cache_bytes(bf16.model.config, 2, 16) * 2 == precision.kv_cache_bytes(
        config, 2, 16
    )

    prompts = [ex["question"] for ex in synthetic.generate("test", 4)]
    options = plain.sampling_config(max_new_tokens=12, temperature=1.0, num_samples=2)
    rng = jax.random.PRNGKey(0)
    want = plain.generate(params, prompts, rng, options).rollout
    got = same.generate(params, prompts, rng, options).rollout
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    low = bf16.generate(params, prompts, rng, options).rollout
    learner = Transformer(config)
    exact = _mismatch(want, learner, params)
    gap = _mismatch(low, learner, params)
    assert float(exact["logp_abs_diff_max"]) < 2e-5
    # bfloat16 rounding of a small random model: hundredths of a nat at most
    assert 1e-4 < float(gap["logp_abs_diff_max"]) < 0.1
    assert 0 < float(gap["kl_k3_mean"]) < 1e-3 and float(gap["ratio_outside"]) == 0.0


def _ppo_entropies(dtype, steps=50):
    """A single-step GRPO-style update (no value, no reference) 50 times on counting rows,
    half of them rewarded: the policy's token entropy each step, and the state's dtypes."""
    from rl_reason.algorithms import grpo, ppo

    config = tiny_llama(vocab_size=VOCAB, dtype=dtype)
    models = ppo.ActorCritic(Transformer(config))
    tx = optax.adam(3e-3)
    params = _params(config)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))
    settings = grpo.grpo_ppo_config(kl_loss_coef=0.0, chunk_size=24)
    update = jax.jit(lambda s, b: ppo.ppo_update(s, b, models=models, tx=tx, config=settings))
    rng = np.random.default_rng(0)
    entropies = []
    for _ in range(steps):
        rows = _counting_batch(rng)
        sign = np.where(np.arange(8) % 2 == 0, 1.0, -1.0)[:, None]
        batch = ppo.PPOBatch(
            **{k: jnp.asarray(v) for k, v in rows.items()},
            advantages=jnp.asarray(np.broadcast_to(sign, rows["tokens"].shape), jnp.float32),
        )
        state, metrics = update(state, batch)
        entropies.append(float(metrics["entropy"]))
    leaves = jax.tree.leaves((state.params, state.opt_state))
    return np.asarray(entropies), {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}


def test_ppo_update_in_bfloat16_compute_follows_float32():
    """50 PPO/GRPO updates with bfloat16 compute and float32 masters track float32: the
    policy's entropy (the loss itself sits near 0) falls by over 4% in both and stays
    within 3% of float32's at every step (measured: 6.6% fall, at most 1.8% apart, the
    gap growing with the steps), and parameters and Adam moments stay float32."""
    f32, dtypes32 = _ppo_entropies("float32")
    bf16, dtypes16 = _ppo_entropies("bfloat16")
    assert dtypes32 == dtypes16 == {jnp.dtype(jnp.float32)}
    assert f32[-1] < 0.96 * f32[0] and bf16[-1] < 0.96 * bf16[0]  # the updates moved both
    np.testing.assert_allclose(bf16, f32, rtol=0.03)
    assert not np.array_equal(bf16, f32)  # bfloat16 really was computed


def test_bfloat16_parameters_with_float32_optimizer_state():
    """optim.state_dtype="float32" under bfloat16 masters: the moments are float32 (their
    bytes twice the parameters'), each update is float32 AdamW's on the widened
    parameters and gradients, rounded once to bfloat16; with float32 parameters the
    wrapper changes no number."""
    from rl_reason.algorithms import optimizer
    from rl_reason.experiments.config import base_config

    optim = base_config().optim
    optim.update(lr=1e-2, warmup_steps=0, schedule="constant", state_dtype="float32")
    tx, _ = optimizer.make_optimizer(optim, 10)
    plain_optim = optim.copy_and_resolve_references()
    plain_optim.state_dtype = ""
    plain, _ = optimizer.make_optimizer(plain_optim, 10)
    config = tiny_llama(vocab_size=VOCAB, param_dtype="bfloat16")
    params = _params(config)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)

    state = tx.init(params)
    moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    assert precision.tree_bytes(moments) == 4 * precision.tree_bytes(params)  # mu, nu in f32
    updates, _ = tx.update(grads, state, params)
    wide = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    expected, _ = plain.update(wide(grads), plain.init(wide(params)), wide(params))
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        assert u.dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(u, np.float32), np.asarray(e.astype(jnp.bfloat16), np.float32)
        )
    # bfloat16 state (the default) rounds the moments themselves.
    assert {x.dtype for x in jax.tree.leaves(plain.init(params)) if x.ndim > 0} == {
        jnp.dtype(jnp.bfloat16)
    }
    # float32 parameters: the wrapped optimizer is the plain one, number for number.
    f32 = wide(params)
    a, _ = tx.update(wide(grads), tx.init(f32), f32)
    b, _ = plain.update(wide(grads), plain.init(f32), f32)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)

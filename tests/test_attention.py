"""Attention kernels: blockwise == dense (outputs and gradients), the cuDNN call's arguments,
the dispatch, and the model and sampler with the blockwise kernel forced."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_reason.models import attention, layers
from rl_reason.models.config import tiny_gemma3, tiny_llama
from rl_reason.models.transformer import KVCache, Transformer, default_positions
from rl_reason.sampling.sampler import SamplingConfig, sample_jit

SCALE = 0.37


def _f32(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


def _case(kind, seed=0, heads=4, kv_heads=2, dim=8):
    """(q, segments of (k, v, key_positions), query_positions, window) for a mask kind.

    causal: one segment, full rows; sliding: the same with a window of 5;
    padded: left padding of different lengths and one row of padding only (it
    sees no key); prefix: a shared batch-1 prefix, a cache half written and
    the new tokens, as the sampler's prefill past a shared prefix; decode: one
    query over a shared prefix, a partly written cache and itself.
    """
    rng = np.random.default_rng(seed)
    b, t = 3, {"decode": 1, "prefix": 11}.get(kind, 37)
    window = 5 if kind == "sliding" else 0
    mask = np.ones((b, t), bool)
    if kind == "padded":
        mask[1, :9] = False
        mask[2, :] = False
    start = {"prefix": 6, "decode": 6 + 13}.get(kind, 0)
    qpos = start + np.maximum(np.cumsum(mask, 1) - 1, 0)
    kpos = np.where(mask, qpos, -1)
    q = _f32(rng, b, t, heads, dim)
    segments = [(_f32(rng, b, kv_heads, t, dim), _f32(rng, b, kv_heads, dim, t), kpos)]
    if kind in ("prefix", "decode"):
        slots, written = 24, start - 6
        cache_pos = np.full((b, slots), -1)
        cache_pos[:, :written] = 6 + np.arange(written)
        cache_pos[1, :3] = -1  # left padding in the cache
        segments.insert(
            0,
            (_f32(rng, b, kv_heads, slots, dim), _f32(rng, b, kv_heads, dim, slots), cache_pos),
        )
        segments.insert(
            0, (_f32(rng, kv_heads, 6, dim), _f32(rng, kv_heads, dim, 6), np.arange(6)[None])
        )
    segments = [(k, v, jnp.asarray(p, jnp.int32)) for k, v, p in segments]
    return q, segments, jnp.asarray(qpos, jnp.int32), window


KINDS = ("causal", "sliding", "padded", "prefix", "decode")


def _dense(q, segments, qpos, window):
    masked = [(k, v, layers.attention_mask(qpos, p, window)) for k, v, p in segments]
    return layers.dot_product_attention(q, masked, SCALE)


def _loss(fn, cotangent, positions):
    def loss(q, kvs):
        segments = [(k, v, p) for (k, v), p in zip(kvs, positions)]
        return jnp.sum(fn(q, segments).astype(jnp.float32) * cotangent)

    return loss


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "blocks",
    [(16, 5), pytest.param((64, 64), marks=pytest.mark.slow)],  # blocks and tails; one
)
def test_blockwise_equals_dense_outputs_and_gradients(kind, blocks):
    q, segments, qpos, window = _case(kind)
    block_q, block_k = blocks
    blockwise = lambda q, s: attention.blockwise_attention(q, s, SCALE, qpos, window, *blocks)
    dense = lambda q, s: _dense(q, s, qpos, window)
    np.testing.assert_allclose(
        jax.jit(blockwise)(q, segments), dense(q, segments), atol=1e-5, rtol=1e-5
    )
    cotangent = _f32(np.random.default_rng(1), *q.shape)
    kvs, positions = [(k, v) for k, v, _ in segments], [p for _, _, p in segments]
    grads = jax.jit(jax.grad(_loss(dense, cotangent, positions), argnums=(0, 1)))(q, kvs)
    got = jax.jit(jax.grad(_loss(blockwise, cotangent, positions), argnums=(0, 1)))(q, kvs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_blockwise_on_random_gqa_shapes():
    rng = np.random.default_rng(7)
    for trial in range(2):
        kv_heads = int(rng.integers(1, 4))
        heads = kv_heads * int(rng.integers(1, 4))
        t = int(rng.integers(2, 40))
        dim = int(rng.choice([4, 8, 16]))
        q = _f32(rng, 2, t, heads, dim)
        k, v = _f32(rng, 2, kv_heads, t, dim), _f32(rng, 2, kv_heads, dim, t)
        mask = rng.random((2, t)) < 0.8
        qpos = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32)
        kpos = jnp.where(mask, qpos, -1)
        window = int(rng.choice([0, 3]))
        segs = [(k, v, kpos)]
        blocks = (int(rng.integers(1, 12)), int(rng.integers(1, 12)))
        got = jax.jit(attention.blockwise_attention, static_argnums=(2, 4, 5, 6))(
            q, segs, SCALE, qpos, window, *blocks
        )
        np.testing.assert_allclose(got, _dense(q, segs, qpos, window), atol=1e-5, rtol=1e-5)
        cotangent = _f32(rng, *q.shape)
        loss = lambda fn: _loss(fn, cotangent, [kpos])
        blockwise = lambda q, s: attention.blockwise_attention(q, s, SCALE, qpos, window, *blocks)
        want = jax.jit(jax.grad(loss(lambda q, s: _dense(q, s, qpos, window)), (0, 1)))(q, [(k, v)])
        got = jax.jit(jax.grad(loss(blockwise), (0, 1)))(q, [(k, v)])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_blockwise_bfloat16_accumulates_in_float32():
    q, segments, qpos, window = _case("padded")
    bf16 = lambda x: x.astype(jnp.bfloat16)
    q16 = bf16(q)
    segs16 = [(bf16(k), bf16(v), p) for k, v, p in segments]
    got = attention.blockwise_attention(q16, segs16, SCALE, qpos, window, 8, 8)
    assert got.dtype == jnp.bfloat16
    want = _dense(q16, segs16, qpos, window)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_cudnn_arguments_give_the_dense_attention(kind):
    """The cuDNN path's layouts and mask translation, run by jax.nn's XLA implementation."""
    q, segments, qpos, window = _case(kind)
    got = attention.cudnn_attention(q, segments, SCALE, qpos, window, implementation="xla")
    np.testing.assert_allclose(got, _dense(q, segments, qpos, window), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # the Pallas interpreter: about a minute of CPU
def test_splash_kernel_in_interpret_mode_gives_the_dense_attention():
    """The TPU path's kernel, masks and segment ids, run by Pallas's interpreter on CPU:
    outputs and gradients on real query rows, a global and a local (cond) layer."""
    rng = np.random.default_rng(3)
    b, t, heads, kv_heads, dim = 2, 128, 2, 1, 32
    q = _f32(rng, b, t, heads, dim)
    k, v = _f32(rng, b, kv_heads, t, dim), _f32(rng, b, kv_heads, dim, t)
    mask = np.ones((b, t), bool)
    mask[1, :40] = False
    qpos = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32)
    kpos = jnp.where(mask, qpos, -1)
    cotangent = _f32(rng, *q.shape) * jnp.asarray(mask)[:, :, None, None]
    for window in (0, 16):
        splash = lambda q, s: attention.splash_attention(
            q, s, SCALE, qpos, window, sliding_window=16, block=128, interpret=True
        )
        dense = lambda q, s: _dense(q, s, qpos, window)
        got = splash(q, [(k, v, kpos)])
        np.testing.assert_allclose(
            np.asarray(got)[mask], np.asarray(dense(q, [(k, v, kpos)]))[mask], atol=1e-5
        )
        want = jax.grad(_loss(dense, cotangent, [kpos]), (0, 1))(q, [(k, v)])
        got = jax.grad(_loss(splash, cotangent, [kpos]), (0, 1))(q, [(k, v)])
        for a, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b_, atol=1e-5, rtol=1e-5)


def test_splash_refuses_what_its_static_masks_cannot_express():
    q, segments, qpos, window = _case("prefix")
    with pytest.raises(ValueError, match="one segment"):
        attention.splash_attention(q, segments, SCALE, qpos, window)
    q, segments, qpos, window = _case("causal")  # 37 tokens
    with pytest.raises(ValueError, match="multiple of 128"):
        attention.splash_attention(q, segments, SCALE, qpos, window)


def test_dispatch():
    choose = attention.choose_implementation
    assert jax.default_backend() == "cpu"
    assert choose("auto", 128, 128, jnp.float32) == "xla"
    assert choose("auto", 256, 256, jnp.float32) == "xla"
    assert choose("auto", 512, 512, jnp.float32) == "blockwise"
    assert choose("auto", 1, 1024, jnp.float32) == "xla"
    assert choose("auto", 1, 16384, jnp.float32) == "xla"  # decode: dense at every length
    assert choose("auto", 2, 16384, jnp.float32) == "blockwise"
    for forced in ("xla", "blockwise", "cudnn", "splash"):
        assert choose(forced, 128, 128, jnp.float32) == forced
    with pytest.raises(ValueError, match="attention="):
        choose("flash", 8, 8, jnp.float32)
    with pytest.raises(ValueError, match="attention="):
        tiny_llama(attention="flash")
    assert attention.block_sizes(37, 37) == (37, 37)
    assert attention.block_sizes(512, 512) == (128, 128)
    assert attention.block_sizes(8192, 8192) == (256, 256)
    assert attention.block_sizes(1, 16384) == (1, attention.DECODE_BLOCK_K)
    assert attention.block_sizes(100, 100, 16, 32) == (16, 32)


# --- the model and the sampler with the blockwise kernel forced ------------------------

CONFIGS = {"llama": tiny_llama(), "gemma3": tiny_gemma3(num_kv_heads=2)}
BLOCKWISE = dict(attention="blockwise", attention_block_q=8, attention_block_k=6)


def _params(config):
    tokens = jnp.zeros((1, 2), jnp.int32)
    return nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens))


def _inputs(config, batch=4, length=14):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, length)), jnp.int32)
    mask = np.ones((batch, length), bool)
    for row in range(batch):
        mask[row, : row * 3] = False
    return tokens, jnp.asarray(mask)


@pytest.mark.slow  # compiles the model's gradient twice (about 20 s of CPU)
def test_model_forward_and_gradients_equal_across_kernels():
    config = CONFIGS["gemma3"].replace(attention="xla")
    params = _params(config)
    tokens, mask = _inputs(config)
    positions = default_positions(mask)

    def loss(params, config):
        model = Transformer(config)
        hidden = model.apply(params, tokens, positions, mask).hidden
        logits = model.apply(params, hidden, method=Transformer.logits)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(picked * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    want_loss, want = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, config)
    got_loss, got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
        params, config.replace(**BLOCKWISE)
    )
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_blockwise_prefill_and_decode_equal_full_forward():
    config = CONFIGS["llama"]
    params = _params(config)
    tokens, mask = _inputs(config)
    positions = default_positions(mask)
    full = Transformer(config.replace(attention="xla"))
    forward = jax.jit(
        lambda p: full.apply(
            p, full.apply(p, tokens, positions, mask).hidden, method=Transformer.logits
        )
    )
    expected = forward(params)
    model = Transformer(config.replace(**BLOCKWISE))
    cache = KVCache.init(config, tokens.shape[0], 20)
    step = jax.jit(lambda p, t, pos, m, c: model.apply(p, t, pos, m, cache=c))
    first = step(params, tokens[:, :9], positions[:, :9], mask[:, :9], cache)
    outs, cache = [first.hidden], first.cache
    for t in range(9, tokens.shape[1]):
        out = step(params, tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache)
        outs.append(out.hidden)
        cache = out.cache
    got = model.apply(params, jnp.concatenate(outs, axis=1), method=Transformer.logits)
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid], atol=1e-5)


def test_sharded_blockwise_forward_equals_single_device():
    from rl_reason.algorithms import train_state as ts
    from rl_reason.parallel import mesh as mesh_lib
    from rl_reason.parallel import sharding as shd

    config = CONFIGS["gemma3"].replace(**BLOCKWISE)
    model = Transformer(config)
    params = _params(config)
    tokens, mask = _inputs(config, batch=8)
    forward = lambda p, t, m: model.apply(p, t, default_positions(m), m).hidden
    expected = jax.jit(forward)(params, tokens, mask)
    mesh = mesh_lib.make_mesh((2, 2, 2))
    shardings = ts.param_shardings(model, mesh, shd.DEFAULT_RULES)
    batch = shd.batch_sharding(mesh)
    with shd.activation_sharding(mesh, shd.DEFAULT_RULES):
        got = jax.jit(forward, in_shardings=(shardings, batch, batch))(
            jax.device_put(params, shardings), tokens, mask
        )
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid], atol=1e-5)


@pytest.mark.parametrize("name", [pytest.param("llama", marks=pytest.mark.slow), "gemma3"])
def test_greedy_sampling_is_the_same_with_either_kernel(name):
    """The sampler's greedy tokens and log-probs with the blockwise kernel, and its decode
    loop still updating the cache in place (no copy of a whole cache buffer)."""
    config = CONFIGS[name].replace(scan_layers=False)
    params = _params(CONFIGS[name])
    rng = np.random.default_rng(1)
    tokens = np.zeros((4, 10), np.int32)
    mask = np.zeros((4, 10), bool)
    for row, n in enumerate((5, 9, 3, 7)):
        tokens[row, 10 - n :] = rng.integers(3, config.vocab_size, n)
        mask[row, 10 - n :] = True
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0, min_rows=0)
    run = lambda model: sample_jit(model, params, tokens, mask, jax.random.PRNGKey(0), sampling)
    want = run(Transformer(config.replace(attention="xla")))
    blockwise = Transformer(config.replace(**BLOCKWISE))
    got = run(blockwise)
    np.testing.assert_array_equal(got.completion_tokens, want.completion_tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)

    hlo = (
        sample_jit.lower(blockwise, params, tokens, mask, jax.random.PRNGKey(0), sampling)
        .compile()
        .as_text()
    )
    slots = tokens.shape[1] + 8
    cache_shapes = {
        f"f32[4,{config.num_kv_heads},{slots},{config.head_dim}]",
        f"f32[4,{config.num_kv_heads},{config.head_dim},{slots}]",
    }
    copies = re.findall(r"= (f32\[[0-9,]+\])\{[0-9,]*\} copy\(", hlo)
    assert not cache_shapes & set(copies), copies


@pytest.mark.parametrize("t", [1, 3])
def test_decode_products_cache_first_are_the_same_sums(t):
    """`attention_scores`/`attention_values` write one query a row cache-first (a faster
    order for XLA:CPU): the same products as the query-first einsums, to rounding; with
    more queries, or a shared segment, they are those einsums exactly."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q, k, v = normal(3, 2, 3, t, 16), normal(3, 2, 40, 16), normal(3, 2, 16, 40)
    probs = jax.nn.softmax(normal(3, 2, 3, t, 40), axis=-1)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k)
    values = jnp.einsum("bkgts,bkds->bkgtd", probs, v)
    exact = t > 1
    for got, want in ((layers.attention_scores(q, k), scores),
                      (layers.attention_values(probs, v), values)):  # fmt: skip
        assert got.shape == want.shape and got.dtype == jnp.float32
        if exact:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    shared_k, shared_v = k[0], v[0]
    np.testing.assert_array_equal(
        layers.attention_scores(q, shared_k), jnp.einsum("bkgtd,ksd->bkgts", q, shared_k)
    )
    np.testing.assert_array_equal(
        layers.attention_values(probs, shared_v), jnp.einsum("bkgts,kds->bkgtd", probs, shared_v)
    )


@pytest.mark.parametrize("t", [1, 4])
def test_a_grouped_segment_equals_its_keys_repeated_for_each_row(t):
    """A prompt cache held once for each group of consecutive rows (the K samples of a
    prompt in the sampler) attends as the same keys copied to every row would, in the
    dense products (read in place) and in the kernels that take it repeated."""
    rng = np.random.default_rng(1)
    rows, groups, kv_heads, heads, dim, prompt = 6, 2, 2, 4, 8, 5
    q = _f32(rng, rows, t, heads, dim)
    group_k = _f32(rng, groups, kv_heads, prompt, dim)
    group_v = _f32(rng, groups, kv_heads, dim, prompt)
    group_pos = np.tile(np.arange(prompt), (groups, 1))
    group_pos[1, :2] = -1  # the second prompt is left-padded
    own_k, own_v = _f32(rng, rows, kv_heads, t, dim), _f32(rng, rows, kv_heads, dim, t)
    qpos = jnp.asarray(prompt + np.tile(np.arange(t), (rows, 1)), jnp.int32)
    per_row = lambda x: jnp.repeat(x, rows // groups, axis=0)  # noqa: E731
    positions = jnp.asarray(per_row(group_pos), jnp.int32)
    own = (own_k, own_v, qpos)
    grouped = [(group_k, group_v, positions), own]
    repeated = [(per_row(group_k), per_row(group_v), positions), own]
    want = _dense(q, repeated, qpos, 0)
    np.testing.assert_allclose(_dense(q, grouped, qpos, 0), want, rtol=1e-6, atol=1e-6)
    for implementation in ("xla", "blockwise"):
        got = attention.attend(
            q, grouped, SCALE, query_positions=qpos, implementation=implementation,
            block_q=2, block_k=3,
        )  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

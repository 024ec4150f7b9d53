"""The transformer: sharded == unsharded, cached decode == full forward, config checks."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_reason.algorithms import train_state as ts
from rl_reason.models import layers
from rl_reason.models.config import ModelConfig, tiny_gemma3, tiny_llama
from rl_reason.models.transformer import (
    KVCache,
    Transformer,
    default_positions,
    stack_layers,
    unstack_layers,
)
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd

CONFIGS = {
    "llama": tiny_llama(qkv_bias=True, heads=("value",)),
    "gemma3": tiny_gemma3(num_kv_heads=2),
}


def _inputs(config, batch=4, length=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), bool)
    for row in range(batch):  # left padding of different lengths
        mask[row, : row * 2] = False
    return jnp.asarray(tokens), jnp.asarray(mask)


def _params(model, seed=0):
    tokens = jnp.zeros((1, 2), jnp.int32)
    return nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens, tokens))


def _full_logits(model, params, tokens, mask):
    out = model.apply(params, tokens, default_positions(mask), mask)
    return model.apply(params, out.hidden, method=Transformer.logits), out


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_forward_equals_single_device(name, mesh_shape):
    model = Transformer(CONFIGS[name])
    params = _params(model)
    tokens, mask = _inputs(model.config, batch=8)
    expected, expected_out = _full_logits(model, params, tokens, mask)

    mesh = mesh_lib.make_mesh(mesh_shape)
    shardings = ts.param_shardings(model, mesh, shd.DEFAULT_RULES)
    sharded_params = jax.device_put(params, shardings)
    if mesh_shape == (1, 4, 2):  # fsdp and tensor really split the weights
        q_kernel = sharded_params["params"]["layers"]["attn"]["q_proj"]["kernel"]
        assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    batch_sharding = shd.batch_sharding(mesh)
    forward = jax.jit(
        lambda p, t, m: _full_logits(model, p, t, m),
        in_shardings=(shardings, batch_sharding, batch_sharding),
    )
    with shd.activation_sharding(mesh, shd.DEFAULT_RULES):
        got, got_out = forward(sharded_params, tokens, mask)
    valid = np.asarray(mask)
    np.testing.assert_allclose(
        np.asarray(got)[valid], np.asarray(expected)[valid], atol=2e-5, rtol=1e-5
    )
    for head in expected_out.heads:
        np.testing.assert_allclose(
            got_out.heads[head][valid], expected_out.heads[head][valid], atol=2e-5
        )


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decode_equals_full_forward(name):
    """Token by token through the cache, past the sliding window (4) for Gemma 3."""
    model = Transformer(CONFIGS[name])
    params = _params(model)
    tokens, mask = _inputs(model.config, length=14)
    positions = default_positions(mask)
    expected, _ = _full_logits(model, params, tokens, mask)

    step = jax.jit(lambda p, t, pos, m, c: model.apply(p, t, pos, m, cache=c))
    cache = KVCache.init(model.config, tokens.shape[0], 16)
    got = []
    for t in range(tokens.shape[1]):
        out = step(params, tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache)
        cache = out.cache
        got.append(model.apply(params, out.hidden, method=Transformer.logits))
    got = jnp.concatenate(got, axis=1)
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid], atol=1e-5)
    assert int(cache.index) == tokens.shape[1]


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_decode_equals_full_forward(name):
    model = Transformer(CONFIGS[name])
    params = _params(model)
    tokens, mask = _inputs(model.config, length=14)
    positions = default_positions(mask)
    expected, _ = _full_logits(model, params, tokens, mask)
    cache = KVCache.init(model.config, tokens.shape[0], 20)
    first = model.apply(params, tokens[:, :9], positions[:, :9], mask[:, :9], cache=cache)
    rest = model.apply(params, tokens[:, 9:], positions[:, 9:], mask[:, 9:], cache=first.cache)
    got = model.apply(params, rest.hidden, method=Transformer.logits)
    np.testing.assert_allclose(got, expected[:, 9:], atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_shared_prefix_cache_equals_full_forward(name):
    """Rows attending to one batch-1 prefix cache compute what prefix + row computes whole,
    past the sliding window and with left padding between prefix and row."""
    model = Transformer(CONFIGS[name])
    params = _params(model)
    suffix, suffix_mask = _inputs(model.config, length=9)
    prefix = jnp.arange(7, dtype=jnp.int32) + 3
    batch = suffix.shape[0]
    tokens = jnp.concatenate([jnp.broadcast_to(prefix, (batch, 7)), suffix], axis=1)
    mask = jnp.concatenate([jnp.ones((batch, 7), bool), suffix_mask], axis=1)
    expected, _ = _full_logits(model, params, tokens, mask)

    shared = model.apply(
        params, prefix[None], jnp.arange(7)[None], cache=KVCache.init(model.config, 1, 7)
    ).cache
    positions = default_positions(mask)[:, 7:]
    cache = KVCache.init(model.config, batch, 12)
    first = model.apply(params, suffix[:, :8], positions[:, :8], suffix_mask[:, :8], cache, shared)
    last = model.apply(params, suffix[:, 8:], positions[:, 8:], None, first.cache, shared)
    hidden = jnp.concatenate([first.hidden, last.hidden], axis=1)
    got = model.apply(params, hidden, method=Transformer.logits)
    real = np.asarray(suffix_mask)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[:, 7:][real], atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_cache_s_rows_are_taken_in_either_layer_layout(scan_layers):
    """KVCache.take_rows picks rows of every layer's keys and values and of the slot
    positions, whether the layers are stacked (scanned) or a tuple (unrolled)."""
    config = tiny_llama(num_layers=2, scan_layers=scan_layers)
    cache = KVCache.init(config, 3, 4)
    fill = lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)
    cache = cache.replace(
        k=jax.tree.map(fill, cache.k),
        v=jax.tree.map(fill, cache.v),
        positions=fill(cache.positions),
    )
    rows = jnp.asarray([2, 0, 2, 1])
    taken = cache.take_rows(rows)
    layers_of = lambda c: [*c.k, *c.v]  # a stacked array or a tuple, layer by layer
    for old, new in zip(layers_of(cache), layers_of(taken), strict=True):
        np.testing.assert_array_equal(new, np.asarray(old)[np.asarray(rows)])
    np.testing.assert_array_equal(taken.positions, np.asarray(cache.positions)[np.asarray(rows)])
    assert int(taken.index) == int(cache.index)


def test_sliding_window_changes_local_layers_only_past_the_window():
    """Within the window a local layer sees what a global one sees; beyond it, not."""
    config = tiny_gemma3(num_layers=2, global_layer_every=2)
    params = _params(Transformer(config))
    wide = Transformer(config.replace(sliding_window=64))
    narrow = Transformer(config)
    tokens, mask = _inputs(config, length=10)
    mask = jnp.ones_like(mask)
    wide_logits, _ = _full_logits(wide, params, tokens, mask)
    narrow_logits, _ = _full_logits(narrow, params, tokens, mask)
    window = config.sliding_window
    np.testing.assert_allclose(narrow_logits[:, :window], wide_logits[:, :window], atol=1e-6)
    assert not np.allclose(narrow_logits[:, window:], wide_logits[:, window:], atol=1e-4)


def test_gemma3_layer_pattern():
    config = tiny_gemma3(num_layers=6, global_layer_every=3)
    assert config.local_layers == (True, True, False, True, True, False)
    assert not any(tiny_llama().local_layers)


def test_param_count_matches_initialised_params():
    for config in [*CONFIGS.values(), tiny_llama(tie_embeddings=False)]:
        params = _params(Transformer(config))
        assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params()


def test_invalid_model_configs_are_clear():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="relu")
    with pytest.raises(ValueError, match="Unknown model config keys"):
        ModelConfig.from_dict({"hidden_size": 3})


@pytest.mark.parametrize("name", CONFIGS)
def test_unrolled_layers_equal_scanned_layers(name):
    """The decoding layout (unrolled, per-layer cache) computes what training's scan does."""
    scanned = Transformer(CONFIGS[name])
    unrolled = Transformer(CONFIGS[name].replace(scan_layers=False))
    params = _params(scanned)
    tokens, mask = _inputs(scanned.config, length=14)
    expected, _ = _full_logits(scanned, params, tokens, mask)
    flat = unstack_layers(params)
    got, _ = _full_logits(unrolled, flat, tokens, mask)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    positions = default_positions(mask)
    out = unrolled.apply(flat, tokens, positions, mask, cache=KVCache.init(unrolled.config, 4, 16))
    assert isinstance(out.cache.k, tuple) and len(out.cache.k) == scanned.config.num_layers
    np.testing.assert_allclose(
        unrolled.apply(flat, out.hidden, method=Transformer.logits), expected, atol=1e-5
    )
    restacked = stack_layers(flat)
    for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(24, 8, 16), (24, 16, 8)], ids=["x_narrower", "dy_narrower"])
def test_cpu_matmul_gradients_are_the_products(shape):
    """`cpu_matmul`'s backward (the narrower operand transposed on its own) gives
    the plain product's gradients, whichever operand it transposes."""
    n, i, o = shape
    rng = np.random.default_rng(0)
    x, w, r = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((n, i), (i, o), (n, o)))
    ours = jax.grad(lambda x, w: jnp.sum(layers.cpu_matmul(x, w) * r), argnums=(0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum((x @ w) * r), argnums=(0, 1))(x, w)
    chex.assert_trees_all_close(ours, plain, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal_shapes(ours, (x, w))


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_agree_across_remat_policies_and_projection_paths(name, monkeypatch):
    """The training gradient on a (2, 2, 2) mesh is the same with every remat policy
    and with the einsum projections other backends use as with CPU's `cpu_matmul`."""
    mesh = mesh_lib.make_mesh((2, 2, 2))
    tokens, mask = _inputs(CONFIGS[name], batch=8, length=12)
    shardings = ts.param_shardings(Transformer(CONFIGS[name]), mesh, shd.DEFAULT_RULES)
    params = jax.device_put(_params(Transformer(CONFIGS[name])), shardings)

    def gradient(config):
        model = Transformer(config)

        def loss(params):
            logits, out = _full_logits(model, params, tokens, mask)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask) + jnp.mean(
                out.heads.get("value", 0.0)
            )

        with shd.activation_sharding(mesh, shd.DEFAULT_RULES):
            return jax.jit(jax.grad(loss), in_shardings=(shardings,))(params)

    kept = CONFIGS[name].replace(remat="none")  # every activation kept: plain autodiff
    expected = gradient(kept)
    for remat in ("full", "dots"):
        chex.assert_trees_all_close(
            gradient(kept.replace(remat=remat)), expected, rtol=1e-5, atol=1e-6
        )
    monkeypatch.setattr(layers, "cpu_layout", lambda: False)
    chex.assert_trees_all_close(gradient(kept), expected, rtol=1e-5, atol=1e-6)

"""LoRA: the adapted model is the base at step 0, only adapters (and scalar heads) train and
hold optimizer state, sharded == unsharded, and PEFT loads our adapters onto the
transformers model with our logits (and we load PEFT's)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from rl_reason.algorithms import ppo, sft
from rl_reason.algorithms import train_state as ts
from rl_reason.models import lora
from rl_reason.models.config import tiny_llama
from rl_reason.models.hf_import import load_hf
from rl_reason.models.transformer import Transformer, default_positions, unstack_layers
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd

RULES = shd.DEFAULT_RULES
CONFIG = lora.LoraConfig(rank=4, alpha=8.0)


def _logits(model, params, tokens):
    mask = jnp.ones(tokens.shape, bool)
    out = model.apply(params, tokens, default_positions(mask), mask)
    return model.apply(params, out.hidden, method=Transformer.logits)


def _batch(vocab, rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (rows, length)).astype(np.int32)
    loss_mask = np.zeros((rows, length), bool)
    loss_mask[:, length // 2 :] = True
    return {"tokens": tokens, "input_mask": np.ones_like(loss_mask), "loss_mask": loss_mask}


@pytest.fixture(scope="module")
def base():
    model = Transformer(tiny_llama(vocab_size=64, heads=("value",)))
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    params = ts.create_train_state(model, optax.sgd(0.0), mesh, RULES, seed=0).params
    return model, jax.device_get(params)


def test_step_zero_is_the_base_model_exactly_and_the_reference_is_the_base(base):
    model, params = base
    adapted = lora.LoraModel(model, CONFIG)
    trained = adapted.init_from(params, jax.random.PRNGKey(1))
    tokens = jnp.asarray(_batch(64)["tokens"])
    np.testing.assert_array_equal(_logits(adapted, trained, tokens), _logits(model, params, tokens))
    assert trained["base"] is params  # the frozen base is the reference, not a copy
    shapes = jax.tree.map(jnp.shape, trained["lora"]["layers"]["attn"]["o_proj"])
    assert shapes == {
        "a": (2, 4 * 16, 4),
        "b": (2, 4, 64),
    }  # [layers, heads*head_dim, r], [.., r, embed]


def _sft_state(model, params, tx, mesh, rng=1):
    adapted = lora.LoraModel(model, CONFIG)
    trained = adapted.init_from(params, jax.random.PRNGKey(rng))
    state = ts.create_train_state(adapted, tx, mesh, RULES, seed=0, params=trained)
    step = ts.jit_step(
        sft.make_sft_step(adapted, tx), mesh, RULES, ts.state_shardings(adapted, tx, mesh, RULES)
    )
    return adapted, state, step


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_the_step_merges_layer_by_layer_what_the_sampler_merges_whole(base, scan_layers):
    """The learner's forward (each block merging its own kernels) equals the plain model
    on `merged` params (what the sampler reads, via `Merger`), which is W + s A B by hand."""
    model, params = base
    if not scan_layers:
        model = Transformer(model.config.replace(scan_layers=False))
        params = unstack_layers(params)
    adapted = lora.LoraModel(model, CONFIG)
    trained = adapted.init_from(params, jax.random.PRNGKey(1))
    noise = lambda x, k: x + 0.05 * jax.random.normal(jax.random.PRNGKey(k), x.shape)  # noqa: E731
    leaves, tree = jax.tree.flatten(trained["lora"])
    trained["lora"] = jax.tree.unflatten(tree, [noise(x, i) for i, x in enumerate(leaves)])
    merged = lora.merged(trained, CONFIG)
    inner = "layers" if scan_layers else "layers_1"
    factors = trained["lora"][inner]["attn"]["q_proj"]
    kernel = params["params"][inner]["attn"]["q_proj"]["kernel"]
    by_hand = kernel + CONFIG.scale * (factors["a"] @ factors["b"]).reshape(kernel.shape)
    np.testing.assert_allclose(
        merged["params"][inner]["attn"]["q_proj"]["kernel"], by_hand, atol=1e-6
    )
    for got, want in zip(jax.tree.leaves(lora.Merger(CONFIG)(trained)), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(got, want)
    tokens = jnp.asarray(_batch(64)["tokens"])
    step, sampler = _logits(adapted, trained, tokens), _logits(model, merged, tokens)
    assert np.abs(np.asarray(step - _logits(model, params, tokens))).max() > 1e-2  # adapted
    np.testing.assert_allclose(step, sampler, atol=1e-5)


def test_the_reference_is_the_base_with_adapters_off_equal_to_a_separate_copy(base):
    """PPO's scoring with the state's own frozen base as the reference (what the
    on-policy learner passes under LoRA) equals scoring with a separate frozen copy of
    the start, while the policy's log-probs (adapters on) differ from both."""
    model, params = base
    models = ppo.ActorCritic(lora.LoraModel(model, CONFIG), None)
    trained = models.policy.init_from(params, jax.random.PRNGKey(1))
    trained["lora"] = jax.tree.map(lambda x: x + 0.05, trained["lora"])  # as after training
    batch = {k: jnp.asarray(v) for k, v in _batch(64).items()}
    shared = ppo.score(models, trained, trained["base"], batch, chunk_size=8)
    separate = ppo.score(models, trained, jax.tree.map(np.copy, params), batch, chunk_size=8)
    np.testing.assert_array_equal(shared["ref_logprobs"], separate["ref_logprobs"])
    assert np.abs(np.asarray(shared["old_logprobs"] - shared["ref_logprobs"])).max() > 1e-3


def test_only_adapters_and_heads_train_and_hold_optimizer_state(base):
    model, params = base
    tx = lora.lora_optimizer(optax.adam(1e-2))
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    adapted, state, step = _sft_state(model, params, tx, mesh)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    lora_leaves = jax.tree.leaves(state.params["lora"])
    head_leaves = jax.tree.leaves(state.params["base"]["params"]["scalar_heads_value"])
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in lora_leaves + head_leaves)
    batch = _batch(64)
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    new = jax.device_get(state.params)
    base_leaves = jax.tree_util.tree_leaves_with_path(new["base"])
    for path, leaf in base_leaves:
        if "scalar_heads" not in jax.tree_util.keystr(path):
            old = params
            for key in path:
                old = old[key.key]
            np.testing.assert_array_equal(leaf, old)  # the frozen base did not move
    assert np.abs(np.asarray(new["lora"]["layers"]["mlp"]["down_proj"]["b"])).max() > 0


def test_sharded_lora_step_equals_one_device(base):
    """SGD: Adam's first step is lr * sign(g), which turns A's zero gradient (B = 0) into
    +-lr wherever rounding leaves a 1e-12 on one side."""
    model, params = base
    tx = lora.lora_optimizer(optax.sgd(0.1))
    one = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    many = mesh_lib.make_mesh((2, 2, 2))
    results = []
    for mesh in (one, many):
        _, state, step = _sft_state(model, params, tx, mesh)
        state, metrics = step(state, shd.shard_batch(_batch(64), mesh))
        results.append(jax.device_get((state.params["lora"], metrics["loss"])))
    for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_peft_loads_our_adapters_onto_transformers_with_our_logits(tmp_path):
    peft = pytest.importorskip("peft")
    hf_config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "base")
    loaded = load_hf(tmp_path / "base")
    model = Transformer(loaded.config)
    config = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = lora.init_adapters(loaded.params, config, jax.random.PRNGKey(2))
    # Non-zero B everywhere, as after training.
    adapters = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), adapters)
    trained = {"base": loaded.params, "lora": adapters}
    tokens = np.random.default_rng(1).integers(0, 97, (2, 12)).astype(np.int32)
    ours = np.asarray(_logits(lora.LoraModel(model, config), trained, jnp.asarray(tokens)))

    lora.export_peft(str(tmp_path / "adapter"), adapters, config)
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not np.allclose(ours, np.asarray(_logits(model, loaded.params, jnp.asarray(tokens))))

    back, back_config = lora.import_peft(str(tmp_path / "adapter"), loaded.params)
    assert back_config == lora.LoraConfig(4, 8.0, tuple(sorted(lora.TARGETS)))
    for x, y in zip(jax.tree.leaves(adapters), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

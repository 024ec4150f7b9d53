"""The SFT step: chunked loss == plain loss, accumulation, sharding, learning."""

import os

import chex
import ml_collections
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rl_reason.algorithms import optimizer, sft
from rl_reason.algorithms import train_state as ts
from rl_reason.algorithms.logprobs import chunked_target_logprobs
from rl_reason.experiments.config import base_config
from rl_reason.models.config import tiny_gemma3, tiny_llama
from rl_reason.models.transformer import Transformer, default_positions
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd


def _optim_config():
    optim = base_config().optim
    optim.update(lr=3e-3, schedule="constant", warmup_steps=0, weight_decay=0.0)
    return optim


def _batch(vocab, batch=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (batch, length)).astype(np.int32)
    input_mask = np.ones((batch, length), bool)
    input_mask[::2, length - 5 :] = False  # right padding on some rows
    loss_mask = input_mask.copy()
    loss_mask[:, :4] = False  # the prompt
    return {"tokens": tokens, "input_mask": input_mask, "loss_mask": loss_mask}


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_logprobs_equal_full_log_softmax(chunk):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 11, 8)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (3, 11)), jnp.int32)
    logits_fn = lambda h: h @ table.T
    got, hits = chunked_target_logprobs(logits_fn, hidden, targets, chunk)
    full = jax.nn.log_softmax(logits_fn(hidden))
    want = jnp.take_along_axis(full, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(hits, full.argmax(-1) == targets)
    # The gradient through the checkpointed chunks is the plain gradient too.
    g_chunk = jax.grad(
        lambda t: chunked_target_logprobs(lambda h: h @ t.T, hidden, targets, chunk)[0].sum()
    )(table)
    g_full = jax.grad(
        lambda t: jnp.take_along_axis(
            jax.nn.log_softmax(hidden @ t.T), targets[..., None], -1
        ).sum()
    )(table)
    np.testing.assert_allclose(g_chunk, g_full, atol=1e-4)


def test_sft_loss_equals_plain_masked_cross_entropy():
    model = Transformer(tiny_gemma3())
    tokens = jnp.zeros((1, 2), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens, tokens))
    batch = {k: jnp.asarray(v) for k, v in _batch(model.config.vocab_size).items()}
    loss, _ = sft.sft_loss(params, batch, model, sft.target_weights(batch).sum(), chunk_size=3)
    out = model.apply(
        params, batch["tokens"], default_positions(batch["input_mask"]), batch["input_mask"]
    )
    logits = model.apply(params, out.hidden, method=Transformer.logits)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    weights = (batch["loss_mask"] & batch["input_mask"])[:, 1:]
    np.testing.assert_allclose(loss, (nll * weights).sum() / weights.sum(), rtol=1e-5)


def _mesh(shape):
    """A mesh over as many devices as the shape asks for ((1, 1, 1) is the unsharded reference)."""
    return mesh_lib.make_mesh(shape, devices=jax.devices()[: int(np.prod(shape))])


def _run(model, batch, mesh_shape, steps=1, tx=None, **step_options):
    mesh = _mesh(mesh_shape)
    schedule = None
    if tx is None:
        tx, schedule = optimizer.make_optimizer(_optim_config(), 100)
    state = ts.create_train_state(model, tx, mesh, shd.DEFAULT_RULES, seed=0)
    step = ts.jit_step(
        sft.make_sft_step(model, tx, lr_schedule=schedule, **step_options),
        mesh,
        shd.DEFAULT_RULES,
        ts.state_shardings(model, tx, mesh, shd.DEFAULT_RULES),
    )
    history = []
    for _ in range(steps):
        state, metrics = step(state, shd.shard_batch(batch, mesh))
        history.append(jax.device_get(metrics))
    return state, history


def test_gradient_accumulation_equals_full_batch():
    model = Transformer(tiny_llama())
    batch = _batch(model.config.vocab_size)
    # Plain SGD, so parameters move by exactly the gradient (Adam's first step
    # would turn rounding noise in near-zero gradients into lr-sized moves).
    sgd = optax.sgd(1.0)
    full, m_full = _run(model, batch, (4, 1, 1), tx=sgd, chunk_size=4)
    acc, m_acc = _run(model, batch, (4, 1, 1), tx=sgd, num_microbatches=2, chunk_size=4)
    np.testing.assert_allclose(m_acc[0]["loss"], m_full[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_acc[0]["grad_norm"], m_full[0]["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_sharded_step_equals_single_device_step():
    model = Transformer(tiny_gemma3(num_kv_heads=2))
    batch = _batch(model.config.vocab_size)
    sgd = optax.sgd(0.5)  # parameters move by the gradient itself (see above)
    one, m_one = _run(model, batch, (1, 1, 1), steps=2, tx=sgd, chunk_size=8)
    sharded, m_sharded = _run(model, batch, (2, 2, 2), steps=2, tx=sgd, chunk_size=8)
    for a, b in zip(m_one, m_sharded):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_sft_lowers_the_loss_on_a_tiny_task():
    model = Transformer(tiny_llama())
    batch = _batch(model.config.vocab_size)
    _, history = _run(model, batch, (8, 1, 1), steps=30, chunk_size=8)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["token_accuracy"] > history[0]["token_accuracy"]


def test_decay_mask_spares_norms_and_embeddings():
    model = Transformer(tiny_llama(tie_embeddings=False))
    tokens = jnp.zeros((1, 2), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens, tokens))
    mask = optimizer.decay_mask(params)["params"]
    assert mask["layers"]["attn"]["q_proj"]["kernel"] and mask["lm_head"]
    assert not mask["embedder"]["embedding"] and not mask["final_norm"]["scale"]


def test_scaled_embedding_rows_move_by_their_factor_and_nothing_else_changes():
    """`embedding_row_scales` multiplies the named rows' AdamW updates; every other
    parameter's update is the plain optimizer's, bit for bit."""
    model = Transformer(tiny_llama())
    tokens = jnp.zeros((1, 2), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens, tokens))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    plain_tx, _ = optimizer.make_optimizer(_optim_config(), 10)
    scaled_tx, _ = optimizer.make_optimizer(
        _optim_config(), 10, embedding_row_scales={3: 30.0, 5: 2.0}
    )
    plain, _ = plain_tx.update(grads, plain_tx.init(params), params)
    scaled, _ = scaled_tx.update(grads, scaled_tx.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(plain, scaled)
    rows = lambda u: np.asarray(u["params"]["embedder"]["embedding"])
    factors = np.ones(rows(plain).shape[0], np.float32)
    factors[[3, 5]] = [30.0, 2.0]
    np.testing.assert_allclose(rows(scaled), rows(plain) * factors[:, None], rtol=1e-6)
    assert np.abs(rows(plain)[3]).min() > 0  # the row had an update to scale
    strip = lambda u: {k: v for k, v in u["params"].items() if k != "embedder"}
    chex.assert_trees_all_equal(strip(plain), strip(scaled))
    unscaled, _ = optimizer.make_optimizer(_optim_config(), 10, embedding_row_scales={3: 1.0})
    assert len(unscaled.init(params)) == len(plain_tx.init(params))  # no transform at 1x


def test_sft_with_lora_trains_adapters_on_the_start_and_resumes_bitwise(tiny_sft_run, tmp_path):
    """lora.rank > 0 from a start model: checkpoints of adapters only, a policy that
    load_run merges from the recorded start, the same end after a stop and a rerun."""
    import conftest
    import jax
    import numpy as np

    from rl_reason import checkpointing
    from rl_reason.experiments import sft as sft_run
    from rl_reason.experiments import sources
    from rl_reason.parallel import mesh as mesh_lib
    from rl_reason.parallel import sharding as shd

    config = conftest.tiny_sft_config()
    config.model_source = ml_collections.ConfigDict({"kind": "run", "path": str(tiny_sft_run)})
    config.lora.update(rank=4, alpha=8.0)
    config.optim.update(lr=1e-2, warmup_steps=0)
    config.train.update(num_steps=4, eval_every=4)
    straight = sft_run.train(config, str(tmp_path / "straight"))
    config.train.stop_after = 2
    sft_run.train(config, str(tmp_path / "resumed"))
    config.train.stop_after = 0
    resumed = sft_run.train(config, str(tmp_path / "resumed"))
    assert straight["loss"] == resumed["loss"]
    checkpoint = checkpointing.Checkpointer(str(tmp_path / "straight" / "checkpoints"))
    assert set(checkpoint.read_integrity(checkpoint.latest_step())["items"]) == {
        "policy.lora",
        "policy.train",
    }
    checkpoint.close()
    mesh = mesh_lib.make_mesh((-1, 1, 1))
    load = lambda path: jax.device_get(sources.load_run(str(path), mesh, shd.DEFAULT_RULES).params)
    a, b, start = load(tmp_path / "straight"), load(tmp_path / "resumed"), load(tiny_sft_run)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    moved = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(start))]
    assert any(moved) and not all(moved)  # the adapted kernels moved, norms and embeddings not

    # launch/export.py: the adapters in PEFT's format start another run where this one
    # ended (lora.init); the merged model is a transformers checkpoint with our logits.
    import subprocess
    import sys

    import torch
    import transformers

    from rl_reason.experiments import adapters
    from rl_reason.models import lora

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    peft_dir, hf_dir = tmp_path / "peft", tmp_path / "hf"
    run = tmp_path / "straight"
    export = [sys.executable, "launch/export.py", f"--run={run}", f"--peft={peft_dir}"]
    subprocess.run([*export, f"--hf={hf_dir}"], check=True, cwd=root, capture_output=True)
    config.lora.init = str(peft_dir)
    base = sources.load_run(str(tiny_sft_run), mesh, shd.DEFAULT_RULES)
    learner = lora.LoraModel(Transformer(base.config), adapters.lora_config(config))
    trained = adapters.initial_params(config, learner, base.params, jax.random.PRNGKey(9))
    for x, y in zip(jax.tree.leaves(lora.merged(trained, learner.lora)), jax.tree.leaves(a)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    tokens = np.random.default_rng(0).integers(3, base.config.vocab_size, (2, 10))
    model = Transformer(base.config.replace(heads=()))
    mask = jnp.ones(tokens.shape, bool)
    hidden = model.apply(a, jnp.asarray(tokens), default_positions(mask), mask).hidden
    ours = np.asarray(model.apply(a, hidden, method=Transformer.logits))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    config.lora.rank = 8
    with pytest.raises(ValueError, match="rank 4"):
        adapters.initial_params(
            config, lora.LoraModel(model, adapters.lora_config(config)), base.params, None
        )

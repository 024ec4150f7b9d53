"""Resume == uninterrupted (bitwise, across an epoch boundary), restore onto another mesh, bad configs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rl_reason import checkpointing
from rl_reason.algorithms import optimizer, sft
from rl_reason.algorithms import train_state as ts
from rl_reason.experiments import config as config_lib
from rl_reason.experiments import sft as sft_experiment
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd

# 64 examples in batches of 16: an epoch is 4 steps, so stopping after step 4
# puts the checkpoint exactly on the epoch boundary.
# configs/sft_synthetic.py: SFT alone (the default job is the study in miniature).
TINY = [
    f"--config={os.path.join(os.path.dirname(__file__), '..', 'configs', 'sft_synthetic.py')}",
    "--config.model.hidden_dim=32",
    "--config.model.num_layers=2",
    "--config.model.head_dim=8",
    "--config.model.mlp_dim=64",
    "--config.data.num_train=64",
    "--config.data.num_eval=16",
    "--config.data.tokenizer_vocab_size=300",
    "--config.train.batch_size=16",
    "--config.train.max_length=96",
    "--config.train.num_steps=7",
    "--config.train.log_every=1",
    "--config.train.eval_every=7",
    "--config.checkpoint.save_interval_steps=1",
    "--config.logging.progress_bar=False",
    "--config.logging.tensorboard=False",
]


def _train(repo_root, workdir, *extra):
    result = subprocess.run(
        [
            sys.executable,
            str(repo_root / "launch" / "train.py"),
            f"--workdir={workdir}",
            *TINY,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    return result


def _final_params(workdir):
    """The saved parameters of the latest checkpoint, read back on the host."""
    config = config_lib.base_config()
    config_json = json.load(open(os.path.join(workdir, "config.json")))
    config.model.update(config_json["model"])
    tokenizer = sft_experiment.tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer"))
    model = sft_experiment.Transformer(sft_experiment.model_config(config, tokenizer))
    optim = config.optim
    optim.update(config_json["optim"])
    tx, _ = optimizer.make_optimizer(optim, config_json["train"]["num_steps"])
    mesh = mesh_lib.make_mesh((-1, 1, 1))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    abstract = ts.abstract_train_state(model, tx, mesh, shd.DEFAULT_RULES)
    items, progress, _ = ckpt.restore(checkpointing.train_state_items("policy", abstract))
    ckpt.close()
    return jax.device_get(checkpointing.merge_train_state("policy", items)), progress


@pytest.mark.slow
def test_resume_in_a_new_process_equals_uninterrupted(tmp_path, repo_root):
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    r = _train(repo_root, straight)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _train(repo_root, resumed, "--config.train.stop_after=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(open(resumed / "metrics.jsonl").readlines()) == 4
    r = _train(repo_root, resumed)
    assert r.returncode == 0, r.stderr[-3000:]

    metrics_a = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    metrics_b = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    assert [m["step"] for m in metrics_b] == list(range(1, 8))
    assert metrics_a == metrics_b  # identical floats, eval included

    state_a, progress_a = _final_params(straight)
    state_b, progress_b = _final_params(resumed)
    assert progress_a == progress_b
    assert progress_a["data"] == {"epoch": 1, "index": 48}
    assert progress_a["models"]["policy"]["hidden_dim"] == 32  # evaluation rebuilds the model from it
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(a, b)


def test_restore_onto_another_mesh_gives_the_same_next_loss(tmp_path):
    from rl_reason.models.config import tiny_llama
    from rl_reason.models.transformer import Transformer

    model = Transformer(tiny_llama())
    optim = config_lib.base_config().optim
    tx, _ = optimizer.make_optimizer(optim, 10)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (8, 12)).astype(np.int32)
    batch = {
        "tokens": tokens,
        "input_mask": np.ones_like(tokens, bool),
        "loss_mask": np.ones_like(tokens, bool),
    }

    def run(mesh, state):
        step = ts.jit_step(
            sft.make_sft_step(model, tx),
            mesh,
            shd.DEFAULT_RULES,
            ts.state_shardings(model, tx, mesh, shd.DEFAULT_RULES),
        )
        return step(state, shd.shard_batch(batch, mesh))

    mesh_a = mesh_lib.make_mesh((8, 1, 1))
    state, _ = run(mesh_a, ts.create_train_state(model, tx, mesh_a, shd.DEFAULT_RULES, seed=0))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, {"state": state}, {"data": {"epoch": 0, "index": 8}}, force=True)
    ckpt.wait()
    _, expected = run(mesh_a, state)

    mesh_b = mesh_lib.make_mesh((1, 4, 2))
    abstract = ts.abstract_train_state(model, tx, mesh_b, shd.DEFAULT_RULES)
    items, progress, _ = ckpt.restore({"state": abstract})  # checksums verify across meshes
    restored = items["state"]
    ckpt.close()
    kernel = restored.params["params"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert progress == {"data": {"epoch": 0, "index": 8}}
    _, got = run(mesh_b, restored)
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.no_such_key=1", "no_such_key"),
        ("--config.optim.lr=fast", "lr"),
    ],
)
def test_bad_overrides_fail_before_training(tmp_path, repo_root, override, message):
    r = _train(repo_root, tmp_path / "bad", override)
    assert r.returncode != 0
    assert message in r.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_validate_names_mesh_and_batch_problems():
    config = config_lib.base_config()
    config.mesh.shape = (3, 1, 1)
    with pytest.raises(ValueError, match="needs 3 devices but 8"):
        config_lib.validate(config)
    config.mesh.shape = (-1, 1, 1)
    config.train.batch_size = 12
    with pytest.raises(ValueError, match="12 rows is not divisible by the 8 batch shards"):
        config_lib.validate(config)
    config.train.batch_size = 32
    config.train.num_microbatches = 3
    with pytest.raises(ValueError, match="num_microbatches=3"):
        config_lib.validate(config)
    config.train.num_microbatches = 1
    config.model.num_kv_heads = 3
    with pytest.raises(ValueError, match="num_kv_heads"):
        config_lib.validate(config)

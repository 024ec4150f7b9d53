"""The study-scale configs, and the real-model PPO config, are valid and fit their
machines, planned without allocating."""

import functools

import jax
import jax.numpy as jnp
import pytest

from rl_reason.algorithms import optimizer, ppo
from rl_reason.algorithms import train_state as ts
from rl_reason.experiments import config as config_lib
from rl_reason.experiments import on_policy, plan
from rl_reason.models.config import ModelConfig
from rl_reason.models.transformer import Transformer

from configs import (
    gemma3_270m_svamp_ppo,
    study_gsm8k_ei,
    study_gsm8k_ppo,
    study_gsm8k_sft,
)

GIB = 2**30
# (mesh, devices, accelerator memory): a TPU v4-64 slice (32 chips of 32 GiB)
# and one box of 8 A100s (80 GB). Leave at least 40% for activations.
TARGETS = [((1, 32, 1), 32, 32 * GIB), ((1, 8, 1), 8, 80e9)]


@pytest.mark.parametrize("mesh_shape, devices, memory", TARGETS, ids=["tpu_v4_64", "8_gpus"])
@pytest.mark.parametrize(
    "module", [study_gsm8k_ppo, study_gsm8k_ei, study_gsm8k_sft], ids=["ppo", "ei", "sft"]
)
def test_study_config_fits(module, mesh_shape, devices, memory):
    config = module.get_config()
    config.mesh.shape = mesh_shape
    if "rl" in config:
        config_lib.validate_rl(config, num_devices=devices)
    if config.algorithm == "sft":
        config_lib.validate(config, num_devices=devices)
    budget = plan.plan_for_config(config, plan.abstract_mesh(mesh_shape))
    assert budget["params"] > 6.5e9 * 4 / devices * 0.95  # every parameter is counted, in float32
    assert budget["total"] < 0.6 * memory, {k: v / GIB for k, v in budget.items()}


@pytest.mark.parametrize("objective", sorted(config_lib.OBJECTIVES))
def test_the_study_ppo_config_takes_every_objective_and_fits(objective):
    """`--config=configs/study_gsm8k_ppo.py:dapo` (and the others): valid on the slice, the
    sizes kept, no critic, so it fits where PPO's does."""
    ppo_config, config = study_gsm8k_ppo.get_config(), study_gsm8k_ppo.get_config(objective)
    config_lib.validate_rl(config, num_devices=32)
    assert config.algorithm == objective and not config.ppo.use_value
    for name in ("num_epochs", "num_minibatches", "num_microbatches"):
        assert config.ppo[name] == ppo_config.ppo[name]
    budget = plan.plan_for_config(config, plan.abstract_mesh((1, 32, 1)))
    assert (
        budget["total"] <= plan.plan_for_config(ppo_config, plan.abstract_mesh((1, 32, 1)))["total"]
    )


def test_a_replicated_7b_policy_does_not_fit_one_gpu_and_the_plan_says_so():
    config = study_gsm8k_ppo.get_config()
    config.mesh.shape = (8, 1, 1)  # pure data parallel: every device holds everything
    budget = plan.plan_for_config(config, plan.abstract_mesh((8, 1, 1)))
    assert budget["total"] > 80e9


def test_the_study_sft_holds_out_the_questions_ei_validates_on():
    sft, ei = study_gsm8k_sft.get_config(), study_gsm8k_ei.get_config()
    assert (sft.data.task, sft.data.num_validation) == (ei.data.task, ei.data.num_validation)
    assert sft.model.to_dict() == ei.model.to_dict()


def test_gemma3_270m_svamp_ppo_config_is_valid_and_its_iteration_traces():
    """The real-model PPO config: valid on one device, its state well within 12 GB, and
    its scoring and update (value head, reference, remat, chunked loss) traced at the
    config's shapes without allocating (benchmarks/gemma3_270m_ppo_memory.py runs it)."""
    config = gemma3_270m_svamp_ppo.get_config()
    config_lib.validate_rl(config, num_devices=1)
    assert tuple(config.mesh.shape) == (1, 1, 1)
    assert (config.model_source.kind, config.data.task) == ("gguf", "svamp")
    rl, pc = config.rl, on_policy.ppo_config(config)
    remat = config.train.remat  # rl.remat before the sampling/train sections took it
    assert pc.use_value and rl.kl_coef > 0 and remat == "full" and pc.chunk_size <= 32
    budget = plan.plan_for_config(config, plan.abstract_mesh((1, 1, 1)))
    assert 1.0e9 < budget["params"] < 1.2e9 and "reference" in budget
    assert budget["total"] < 6e9, {k: v / GIB for k, v in budget.items()}

    model_config = ModelConfig.from_dict(config.model).replace(heads=("value",))
    assert model_config.remat == remat and model_config.vocab_size == 262_144
    models = ppo.ActorCritic(Transformer(model_config))
    tx, schedule = optimizer.make_optimizer(config.optim, rl.num_iterations)
    state = jax.eval_shape(
        lambda: ts._new_state(ppo.trained(models), tx, jax.random.PRNGKey(0), None)
    )
    rows, length = rl.prompts_per_iteration * rl.num_samples, 128 + rl.max_new_tokens
    shape = lambda dtype: jax.ShapeDtypeStruct((rows, length), dtype)
    sequences = {"tokens": shape(jnp.int32), "input_mask": shape(bool), "loss_mask": shape(bool)}
    score = functools.partial(ppo.score, models, chunk_size=pc.chunk_size)
    scored = jax.eval_shape(score, state.params, state.params, sequences)
    assert set(scored) == {"old_logprobs", "old_values", "ref_logprobs"}
    batch = {**sequences, **scored, "advantages": shape(jnp.float32), "returns": shape(jnp.float32)}
    update = ppo.make_ppo_update(models, tx, pc, lr_schedule=schedule)
    new_state, metrics = jax.eval_shape(update, state, batch)
    same = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert same(new_state.params) == same(state.params)
    assert {"value_loss", "explained_variance", "approx_kl"} <= set(metrics)

"""What a run will hold on each device, computed without allocating anything.

Study-scale runs (a 7B policy with a value head, a frozen reference, AdamW,
a rollout's KV cache) are planned on a laptop: the state's shapes come from
`jax.eval_shape`, its shardings from the logical-axis rules on a mesh that
need not exist here (`jax.sharding.AbstractMesh`), and each array's bytes per
device from its shard shape. A config that would not fit its accelerators
fails here, before anyone books a pod slice.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from rl_reason.algorithms import optimizer
from rl_reason.algorithms import train_state as ts
from rl_reason.experiments import config as config_lib
from rl_reason.models.config import ModelConfig
from rl_reason.models.transformer import KEY_CACHE_AXES, VALUE_CACHE_AXES, KVCache, Transformer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd


def abstract_mesh(shape, axis_names=mesh_lib.AXIS_NAMES) -> AbstractMesh:
    return AbstractMesh(tuple(shape), tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))


def bytes_per_device(shapes: Any, shardings: Any) -> int:
    """The largest per-device footprint of arrays `shapes` laid out by `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        total += math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def memory_plan(
    model_config: ModelConfig,
    optim: ml_collections.ConfigDict,
    mesh: AbstractMesh,
    rules: shd.Rules,
    *,
    reference: bool,
    sampling_rows: int,
    sampling_length: int,
) -> dict[str, int]:
    """Bytes per device of a run's state: the trained model (params + optimizer
    moments), a frozen reference if any, one sampling call's KV cache (none
    when `sampling_rows` is 0: SFT samples nothing)."""
    model = Transformer(model_config)
    tx, _ = optimizer.make_optimizer(optim, 1)
    state_shapes = jax.eval_shape(
        functools.partial(ts._new_state, model, tx), jax.random.PRNGKey(0), None
    )
    state_shardings = ts.state_shardings(model, tx, mesh, rules)
    plan = {
        "params": bytes_per_device(state_shapes.params, state_shardings.params),
        "optimizer": bytes_per_device(state_shapes.opt_state, state_shardings.opt_state),
    }
    if reference:
        plan["reference"] = plan["params"]
    if sampling_rows:
        plan["kv_cache"] = _kv_cache_bytes(
            model_config, mesh, rules, sampling_rows, sampling_length
        )
    plan["total"] = sum(plan.values())
    return plan


def _kv_cache_bytes(model_config: ModelConfig, mesh, rules, sampling_rows, sampling_length) -> int:
    cache = jax.eval_shape(
        lambda: KVCache.init(
            model_config.replace(scan_layers=False), sampling_rows, sampling_length
        )
    )
    k_sharding = shd.named_sharding(mesh, rules, KEY_CACHE_AXES, cache.k[0].shape)
    v_sharding = shd.named_sharding(mesh, rules, VALUE_CACHE_AXES, cache.v[0].shape)
    return model_config.num_layers * (
        bytes_per_device(cache.k[0], k_sharding) + bytes_per_device(cache.v[0], v_sharding)
    )


def plan_for_config(config: ml_collections.ConfigDict, mesh: AbstractMesh) -> dict[str, int]:
    """memory_plan of an RL (`rl` section), EI (`ei` section) or SFT (neither) config,
    for the model its `model` section describes (the shape of what model_source
    will load)."""
    config_lib.resolve_moved_keys(config)
    section = config.rl if "rl" in config else config.get("ei")
    if section is None:  # SFT: the trained model alone
        return memory_plan(
            ModelConfig.from_dict(config.model),
            config.optim,
            mesh,
            shd.rules_from_config(config.mesh.rules),
            reference=False,
            sampling_rows=0,
            sampling_length=0,
        )
    reference = "rl" in config and (config.rl.kl_coef > 0 or config.ppo.kl_loss_coef > 0)
    heads = ("value",) if "ppo" in config and config.ppo.use_value else ()
    model_config = ModelConfig.from_dict(config.model).replace(heads=heads)
    return memory_plan(
        model_config,
        config.optim,
        mesh,
        shd.rules_from_config(config.mesh.rules),
        reference=reference,
        sampling_rows=config.sampling.batch_size
        * (config.sampling.samples_per_call or section.num_samples),
        sampling_length=max(config.sampling.prompt_buckets) + section.max_new_tokens,
    )

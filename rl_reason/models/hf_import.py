"""Import Hugging Face checkpoints (Llama, Qwen2, Gemma 3) straight into their mesh shardings.

Every parameter is built with `jax.make_array_from_callback`: each device (of
this host) receives only its shard, cut from memory-mapped checkpoint tensors
and cast to the configured param dtype on the host. Nothing is assembled on
one device first, so a model is importable whenever its shards fit.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import flax.traverse_util
import jax
import numpy as np
import transformers
from jax.sharding import Mesh, SingleDeviceSharding

from rl_reason.models import hf_weights
from rl_reason.models.config import ModelConfig
from rl_reason.models.hf_config import model_config_from_hf, read_hf_config
from rl_reason.models.safetensors_io import SafetensorsCheckpoint
from rl_reason.models.transformer import Transformer, init_params
from rl_reason.parallel import sharding as shd

# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class TensorSource(Protocol):
    """Checkpoint tensors by HF name, in HF layout and conventions."""

    @property
    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


class LoadedModel(NamedTuple):
    """What an import returns; unpacks as (config, params, tokenizer)."""

    config: ModelConfig
    params: Any  # {"params": ...} in the layout config.scan_layers names
    tokenizer: transformers.PreTrainedTokenizerBase | None


def _abbreviate(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _layer_and_path(path: tuple[str, ...]) -> tuple[int | str | None, tuple[str, ...]]:
    """("layers", ...) is stacked ("all"), ("layers_3", ...) is layer 3, else not per-layer."""
    head = path[0]
    if head == "layers":
        return "all", path[1:]
    if head.startswith("layers_"):
        return int(head[len("layers_") :]), path[1:]
    return None, path


def _plan(config: ModelConfig, abstract: dict) -> dict[tuple[str, ...], tuple]:
    """For every Flax leaf: (spec, HF names it is read from, one layer's shape)."""
    specs = {(s.per_layer, s.path): s for s in hf_weights.tensor_specs(config)}
    plan, unfilled = {}, []
    for path, leaf in flax.traverse_util.flatten_dict(abstract).items():
        layer, inner = _layer_and_path(path)
        spec = specs.get((layer is not None, inner))
        if spec is None:
            unfilled.append("/".join(path))
            continue
        if layer == "all":
            names, shape = spec.hf_names(leaf.shape[0]), leaf.shape[1:]
        else:
            names, shape = [spec.hf_name.format(layer)], leaf.shape
        plan[path] = (spec, names, shape)
    if unfilled:
        raise ValueError(
            f"No checkpoint tensor fills the model parameters {_abbreviate(unfilled)}"
            " (scalar heads are not part of a causal-LM checkpoint; add them after import)."
        )
    return plan


def _check_tensors(config: ModelConfig, plan: dict, source: TensorSource) -> None:
    problems = []
    expected = {name: (spec, shape) for spec, names, shape in plan.values() for name in names}
    missing = set(expected) - source.names
    ignorable = {n for n in source.names if n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints store the copy
    unexpected = source.names - set(expected) - ignorable
    if missing:
        problems.append(f"missing tensors: {_abbreviate(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_abbreviate(unexpected)}")
    for name, (spec, shape) in sorted(expected.items()):
        want = hf_weights.hf_shape(spec, shape)
        if name in source.names and source.shape(name) != want:
            problems.append(f"{name} has shape {source.shape(name)}, expected {want}")
    if problems:
        raise ValueError("The checkpoint does not match the model config: " + "; ".join(problems))


def _place(leaf, sharding, spec, names, shape, source, offset) -> jax.Array:
    """One parameter, built shard by shard from the checkpoint tensors."""

    @functools.cache
    def layer(i: int) -> np.ndarray:  # a view for safetensors; cached for dequantized GGUF
        return hf_weights.to_flax(spec, source.get(names[i]), shape, offset)

    stacked = leaf.ndim == len(shape) + 1

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return np.array(layer(0)[index], leaf.dtype)
        rows = range(len(names))[index[0]]
        return np.stack([np.asarray(layer(i)[index[1:]], leaf.dtype) for i in rows])

    return jax.make_array_from_callback(leaf.shape, sharding, shard)


def place_params(
    config: ModelConfig,
    source: TensorSource,
    mesh: Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
) -> dict:
    """The params of Transformer(config), read from `source`, each leaf in its sharding.

    With a mesh the shardings are the training shardings (`param_shardings`);
    without one every leaf lands on the first device.
    """
    init = functools.partial(init_params, Transformer(config))
    abstract = jax.eval_shape(lambda: nn.meta.unbox(init(jax.random.PRNGKey(0))))
    if mesh is None:
        one = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        shardings = shd.param_shardings(init, mesh, rules)
    plan = _plan(config, abstract["params"])
    _check_tensors(config, plan, source)
    offset = hf_weights.norm_offset(config)
    flat_leaves = flax.traverse_util.flatten_dict(abstract["params"])
    flat_shardings = flax.traverse_util.flatten_dict(shardings["params"])
    placed = {
        path: _place(flat_leaves[path], flat_shardings[path], *plan[path], source, offset)
        for path in flat_leaves
    }
    return {"params": flax.traverse_util.unflatten_dict(placed)}


def load_tokenizer(directory: str | os.PathLike) -> transformers.PreTrainedTokenizerBase | None:
    """The directory's tokenizer, or None when it has no tokenizer files."""
    directory = os.fspath(directory)
    if not any(os.path.exists(os.path.join(directory, n)) for n in _TOKENIZER_FILES):
        return None
    return transformers.AutoTokenizer.from_pretrained(directory)


def load_hf(
    directory: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    **overrides,
) -> LoadedModel:
    """Imports a HF checkpoint directory (config.json, *.safetensors, tokenizer files).

    `overrides` are ModelConfig fields the checkpoint does not fix: dtype,
    param_dtype (float32 by default, whatever the checkpoint's dtype),
    remat, scan_layers.
    """
    config = model_config_from_hf(read_hf_config(directory), **overrides)
    params = place_params(config, SafetensorsCheckpoint(directory), mesh, rules)
    return LoadedModel(config, params, load_tokenizer(directory))

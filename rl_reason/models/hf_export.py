"""Export a model to a Hugging Face directory that transformers (and vLLM) load.

Writes config.json, model.safetensors (or shards with an index) and, when
given, the tokenizer. Scalar heads (e.g. PPO's value head) are not part of a
causal-LM checkpoint and are left out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import jax
import numpy as np

from rl_reason.checkpointing import write_bytes_atomic
from rl_reason.models import hf_weights
from rl_reason.models.config import ModelConfig
from rl_reason.models.hf_config import hf_config_dict
from rl_reason.models.safetensors_io import write_checkpoint
from rl_reason.parallel import sharding as shd


def hf_state_dict(
    config: ModelConfig, params: Any, dtype: str | None = None
) -> dict[str, np.ndarray]:
    """HF tensor name -> host array, from params in either layer layout.

    dtype (e.g. "bfloat16") casts every tensor; by default each keeps its param dtype.
    """
    flat = flax.traverse_util.flatten_dict(params["params"])
    offset = hf_weights.norm_offset(config)
    out = {}
    for spec in hf_weights.tensor_specs(config):
        if not spec.per_layer:
            arrays = {spec.hf_name: shd.to_host(flat[spec.path])}
        elif ("layers", *spec.path) in flat:
            stacked = shd.to_host(flat[("layers", *spec.path)])
            arrays = {spec.hf_name.format(i): x for i, x in enumerate(stacked)}
        else:
            arrays = {
                spec.hf_name.format(i): shd.to_host(flat[(f"layers_{i}", *spec.path)])
                for i in range(config.num_layers)
            }
        for name, array in arrays.items():
            tensor = hf_weights.to_hf(spec, array, offset)
            out[name] = tensor if dtype is None else tensor.astype(dtype)
    return out


def export_hf(
    directory: str | os.PathLike,
    config: ModelConfig,
    params: Any,
    tokenizer: Any = None,
    *,
    dtype: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes `params` of Transformer(config) as a HF checkpoint directory.

    Token ids come from the tokenizer unless `extra_config` gives them;
    `extra_config` also carries max_position_embeddings and other fields the
    ModelConfig does not hold. Every host gathers the parameters; the first writes.
    """
    extra = dict(extra_config or {})
    if tokenizer is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            extra.setdefault(name, getattr(tokenizer, name))
    hf_config = hf_config_dict(config, extra)
    if dtype:
        hf_config["dtype"] = dtype
    tensors = hf_state_dict(config, params, dtype)
    if jax.process_index() != 0:
        return
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    write_bytes_atomic(
        os.path.join(directory, "config.json"),
        (json.dumps(hf_config, indent=2, sort_keys=True)).encode(),
    )
    write_checkpoint(directory, tensors, max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)

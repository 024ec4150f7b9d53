"""Where each Hugging Face tensor lives in the Flax params tree, and how its layout differs.

One table serves import and export, so the two cannot drift apart. HF Linear
weights are [out, in] with heads fused into one axis; the Flax kernels are
[in..., out...] with heads split ([E, H, D] for q/k/v, [H, D, E] for o).
Gemma's RMSNorm multiplies by (1 + w) where the Flax model multiplies by its
scale, so Gemma norms are offset by one on the way in and out.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from rl_reason.models.config import ModelConfig
from rl_reason.models.hf_config import model_family

EMBEDDING, LINEAR, BIAS, NORM = "embedding", "linear", "bias", "norm"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and its Flax parameter.

    hf_name holds "{}" for the layer index of per-layer tensors, whose path is
    then relative to one layer (under params/layers or params/layers_<i>).
    For LINEAR, in_dims says how many leading Flax dims form HF's input dim.
    """

    hf_name: str
    path: tuple[str, ...]
    kind: str
    in_dims: int = 1

    @property
    def per_layer(self) -> bool:
        return "{}" in self.hf_name

    def hf_names(self, num_layers: int) -> list[str]:
        if not self.per_layer:
            return [self.hf_name]
        return [self.hf_name.format(i) for i in range(num_layers)]


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of `config`'s HF checkpoint (scalar heads have none)."""
    gemma = model_family(config) == "gemma3"
    layer, attn = "model.layers.{}.", "model.layers.{}.self_attn."
    specs = [TensorSpec("model.embed_tokens.weight", ("embedder", "embedding"), EMBEDDING)]
    for name in ("q_proj", "k_proj", "v_proj"):
        specs.append(TensorSpec(f"{attn}{name}.weight", ("attn", name, "kernel"), LINEAR))
        if config.qkv_bias:
            specs.append(TensorSpec(f"{attn}{name}.bias", ("attn", name, "bias"), BIAS))
    specs.append(TensorSpec(f"{attn}o_proj.weight", ("attn", "o_proj", "kernel"), LINEAR, 2))
    if config.qk_norm:
        for name in ("q_norm", "k_norm"):
            specs.append(TensorSpec(f"{attn}{name}.weight", ("attn", name, "scale"), NORM))
    for name in ("gate_proj", "up_proj", "down_proj"):
        specs.append(TensorSpec(f"{layer}mlp.{name}.weight", ("mlp", name, "kernel"), LINEAR))
    norms = {"input_layernorm": "pre_attn_norm"}
    if gemma:
        norms.update(
            post_attention_layernorm="post_attn_norm",
            pre_feedforward_layernorm="pre_mlp_norm",
            post_feedforward_layernorm="post_mlp_norm",
        )
    else:
        norms.update(post_attention_layernorm="pre_mlp_norm")
    for hf, flax_name in norms.items():
        specs.append(TensorSpec(f"{layer}{hf}.weight", (flax_name, "scale"), NORM))
    specs.append(TensorSpec("model.norm.weight", ("final_norm", "scale"), NORM))
    if not config.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head",), LINEAR))
    return specs


def norm_offset(config: ModelConfig) -> float:
    return 1.0 if model_family(config) == "gemma3" else 0.0


def hf_shape(spec: TensorSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of a Flax parameter of (one layer's) shape `shape`."""
    if spec.kind == LINEAR:
        return (math.prod(shape[spec.in_dims :]), math.prod(shape[: spec.in_dims]))
    return shape if spec.kind == EMBEDDING else (math.prod(shape),)


def to_flax(spec: TensorSpec, tensor: np.ndarray, shape: tuple[int, ...], offset: float):
    """HF tensor -> Flax layout; a view of `tensor` except for norms (which are small)."""
    if spec.kind == LINEAR:
        return tensor.T.reshape(shape)
    if spec.kind == NORM:
        return (tensor.astype(np.float32) + offset).reshape(shape)
    return tensor.reshape(shape)


def to_hf(spec: TensorSpec, array: np.ndarray, offset: float) -> np.ndarray:
    """Flax layout -> HF tensor (the inverse of to_flax)."""
    if spec.kind == LINEAR:
        return array.reshape(math.prod(array.shape[: spec.in_dims]), -1).T
    if spec.kind == NORM:
        return (array.astype(np.float32) - offset).astype(array.dtype)
    return array.reshape(hf_shape(spec, array.shape))

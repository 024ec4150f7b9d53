"""Hugging Face config.json <-> ModelConfig for the Llama, Qwen2 and Gemma 3 families.

Reading goes through `transformers.AutoConfig`, which already normalises the
legacy spellings (rope_theta / rope_scaling / rope_local_base_freq /
sliding_window_pattern) into `rope_parameters` and `layer_types`. Anything
the rl_reason model cannot compute exactly (other RoPE types, softcapping,
biases it lacks, irregular sliding-window patterns) is an error, not a
silent approximation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import transformers

from rl_reason.models.config import ModelConfig

# HF model_type -> (family, architecture written on export).
MODEL_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "gemma3_text": ("gemma3", "Gemma3ForCausalLM"),
}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_HF_ACTIVATIONS = {v: k for k, v in _ACTIVATIONS.items()}
_ROPE_TYPES = ("default", "linear", "llama3")
# Keys of a config.json that describe the architecture in other words than ours
# (legacy RoPE spellings, window switches); never taken from `extra` on export.
_ARCHITECTURE_KEYS = {
    "model_type",
    "rope_scaling",
    "rope_theta",
    "rope_local_base_freq",
    "sliding_window_pattern",
    "use_sliding_window",
    "max_window_layers",
    "quantization_config",
}


def read_hf_config(directory: str | os.PathLike) -> transformers.PretrainedConfig:
    """The config.json of a checkpoint directory, rejected early if its family is unsupported."""
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No config.json in {os.fspath(directory)}.")
    with open(path) as f:
        raw = json.load(f)
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"Unsupported architecture {raw.get('architectures')} (model_type {model_type!r});"
            f" rl_reason imports {sorted(a for _, a in MODEL_TYPES.values())}."
        )
    return transformers.AutoConfig.from_pretrained(os.fspath(directory))


def _rope_fields(rope: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    rope_type = rope.get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        problems.append(f"rope_type {rope_type!r} (supported: {_ROPE_TYPES})")
        return {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']}")
    fields = {"rope_base": float(rope["rope_theta"])}
    if rope_type == "default":
        return fields
    fields.update(rope_scaling_factor=float(rope["factor"]), rope_scaling_type=rope_type)
    if rope_type == "llama3":
        fields.update(
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_positions=int(rope["original_max_position_embeddings"]),
        )
    return fields


def _window_fields(hf: Any, problems: list[str]) -> dict[str, Any]:
    """layer_types -> (sliding_window, global_layer_every): one global layer every N."""
    layer_types = list(getattr(hf, "layer_types", None) or [])
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        problems.append(f"layer types {unknown}")
        return {}
    local = [t == "sliding_attention" for t in layer_types]
    if not any(local):
        return {"sliding_window": 0, "global_layer_every": 1}
    every = local.index(False) + 1 if not all(local) else len(local) + 1
    if local != [(i + 1) % every != 0 for i in range(len(local))]:
        problems.append(
            f"layer_types {layer_types} are not one global layer every N (which the model computes)"
        )
    return {"sliding_window": int(hf.sliding_window), "global_layer_every": every}


def model_config_from_hf(hf: transformers.PretrainedConfig, **overrides) -> ModelConfig:
    """The ModelConfig computing what `hf` does; `overrides` set dtypes, remat, layout."""
    if hf.model_type not in MODEL_TYPES:
        raise ValueError(
            f"Unsupported model_type {hf.model_type!r}; supported: {list(MODEL_TYPES)}"
        )
    family, architecture = MODEL_TYPES[hf.model_type]
    problems: list[str] = []
    activation = hf.hidden_activation if family == "gemma3" else hf.hidden_act
    if activation not in _ACTIVATIONS:
        problems.append(f"activation {activation!r}")
    fields: dict[str, Any] = {
        "vocab_size": hf.vocab_size,
        "hidden_dim": hf.hidden_size,
        "num_layers": hf.num_hidden_layers,
        "num_heads": hf.num_attention_heads,
        "num_kv_heads": hf.num_key_value_heads or hf.num_attention_heads,
        "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        "mlp_dim": hf.intermediate_size,
        "activation": _ACTIVATIONS.get(activation, "silu"),
        "norm_eps": float(hf.rms_norm_eps),
        "tie_embeddings": bool(hf.tie_word_embeddings),
        "init_std": float(hf.initializer_range),
        "qkv_bias": family == "qwen2",
    }
    fields.update(_window_fields(hf, problems))
    if family == "gemma3":
        rope = hf.rope_parameters
        local_rope = rope["sliding_attention"]
        if local_rope.get("rope_type", "default") != "default":
            problems.append(f"scaled RoPE on sliding layers ({local_rope})")
        fields.update(_rope_fields(rope["full_attention"], problems))
        fields.update(
            rope_local_base=float(local_rope["rope_theta"]),
            qk_norm=True,
            sandwich_norms=True,
            scale_embeddings=True,
            query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
        )
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(hf, name, None) is not None:
                problems.append(f"{name}={getattr(hf, name)}")
        if getattr(hf, "use_bidirectional_attention", False):
            problems.append("use_bidirectional_attention=True")
    else:
        fields.update(_rope_fields(hf.rope_parameters, problems))
    for name in ("attention_bias", "mlp_bias"):
        if family != "qwen2" and getattr(hf, name, False):
            problems.append(f"{name}=True")
    if problems:
        raise ValueError(f"Cannot import this {architecture}: unsupported " + "; ".join(problems))
    return ModelConfig(**{**fields, **overrides})


def model_family(config: ModelConfig) -> str:
    """The HF family whose model computes what `config` does ("llama", "qwen2", "gemma3")."""
    gemma_switches = (config.qk_norm, config.sandwich_norms, config.scale_embeddings)
    if all(gemma_switches) and config.activation == "gelu_tanh" and not config.qkv_bias:
        return "gemma3"
    plain = (
        not any(gemma_switches)
        and config.activation == "silu"
        and config.sliding_window == 0
        and config.query_pre_attn_scalar in (0, config.head_dim)
    )
    if plain:
        return "qwen2" if config.qkv_bias else "llama"
    raise ValueError(
        "No Hugging Face architecture computes this ModelConfig (Llama/Qwen2: SiLU, no QK-norm,"
        " sandwich norms, embedding scaling or sliding window; Gemma 3: all of QK-norm, sandwich"
        f" norms, embedding scaling, tanh GELU, no q/k/v bias): {config}"
    )


def _hf_rope(config: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_base}
    if config.rope_scaling_factor != 1.0 or config.rope_scaling_type != "linear":
        rope.update(rope_type=config.rope_scaling_type, factor=config.rope_scaling_factor)
    if config.rope_scaling_type == "llama3":
        rope.update(
            low_freq_factor=config.rope_low_freq_factor,
            high_freq_factor=config.rope_high_freq_factor,
            original_max_position_embeddings=config.rope_original_max_positions,
        )
    return rope


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def hf_config_dict(config: ModelConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of `config`'s HF architecture.

    `extra` supplies what ModelConfig does not hold (max_position_embeddings,
    token ids, ...), e.g. the imported checkpoint's config.json; the
    architectural fields are always ours. The legacy
    rope_theta / rope_scaling keys are written too, for readers older than
    transformers 5 (vLLM, llama.cpp's converter).
    """
    family = model_family(config)
    model_type, architecture = next((t, a) for t, (f, a) in MODEL_TYPES.items() if f == family)
    rope = _hf_rope(config)
    fields: dict[str, Any] = {
        "architectures": [architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "dtype": config.param_dtype,
    }
    legacy: dict[str, Any] = {"rope_theta": config.rope_base}
    if rope["rope_type"] != "default":
        legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if family == "gemma3":
        local = config.local_layers
        fields.update(
            hidden_activation=_HF_ACTIVATIONS[config.activation],
            query_pre_attn_scalar=_int_if_whole(config.query_pre_attn_scalar or config.head_dim),
            sliding_window=config.sliding_window or None,
            layer_types=["sliding_attention" if x else "full_attention" for x in local],
            rope_parameters={
                "full_attention": rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_base},
            },
            sliding_window_pattern=config.global_layer_every,
            attention_bias=False,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
        legacy["rope_local_base_freq"] = config.rope_local_base
    else:
        fields.update(hidden_act="silu", rope_parameters=rope)
        if family == "llama":
            fields.update(attention_bias=False, mlp_bias=False)
        else:
            fields.update(use_sliding_window=False)
    kept = {k: v for k, v in (extra or {}).items() if k not in _ARCHITECTURE_KEYS}
    hf = transformers.AutoConfig.for_model(model_type, **{**kept, **fields})
    return {**hf.to_diff_dict(), **legacy}

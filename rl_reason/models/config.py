"""One configuration for the decoder-only transformers rl_reason trains.

The same fields describe the Llama family (Llama 2/3, Qwen2 with q/k/v biases)
and Gemma 3 (sandwich norms, QK-norm, GeGLU, scaled embeddings, interleaved
sliding-window layers); presets below name the shapes used in tests,
benchmarks and the built-in task.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and architectural switches of a decoder-only transformer."""

    vocab_size: int = 256
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 128
    activation: str = "silu"
    norm_eps: float = 1e-6
    rope_base: float = 10_000.0
    # RoPE scaling of the global layers by rope_scaling_factor: "linear" divides
    # every frequency by it; "llama3" (Llama 3.1) divides the low frequencies,
    # keeps the high ones and interpolates between the two bands.
    rope_scaling_factor: float = 1.0
    rope_scaling_type: str = "linear"
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    qkv_bias: bool = False
    tie_embeddings: bool = True
    # Gemma 3 switches.
    qk_norm: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    # Queries are scaled by query_pre_attn_scalar**-0.5 (head_dim when 0).
    query_pre_attn_scalar: float = 0.0
    # Sliding-window (local) attention: every layer whose index i satisfies
    # (i + 1) % global_layer_every != 0 is local when sliding_window > 0.
    sliding_window: int = 0
    global_layer_every: int = 1
    rope_local_base: float = 10_000.0
    # Scalar heads on the final hidden state, e.g. ("value",) for PPO.
    heads: tuple[str, ...] = ()
    # Compute and parameter (master) dtypes; rl_reason/models/precision.py states the policy.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # The final norm and the unembedding in float32 whatever `dtype` is (TRL's
    # cast_lm_head_to_fp32); a no-op with float32 compute.
    lm_head_fp32: bool = False
    init_std: float = 0.02
    # What the backward pass recomputes instead of keeping: "dots" keeps the
    # projections' outputs and recomputes attention and the elementwise work
    # (the fastest step measured on CPU for a 58M Llama, less memory than "none"),
    # "full" keeps only each layer's input, "none" keeps everything.
    remat: str = "dots"
    # Scan over stacked layers (training) or unroll them (decoding).
    scan_layers: bool = True
    # Which attention kernel (rl_reason/models/attention.py): "auto" picks by
    # backend and shape (GPU cuDNN, TPU splash, CPU dense up to 256 keys, or
    # 1,024 cache slots in decode, and blockwise above); "xla" (dense), "blockwise", "cudnn" or "splash" force one.
    attention: str = "auto"
    # The blockwise kernel's query and key block sizes; 0: chosen by shape.
    attention_block_q: int = 0
    attention_block_k: int = 0

    def __post_init__(self):
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation={self.activation!r} not in {ACTIVATIONS}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                problems.append(f"{name}={getattr(self, name)!r} not in {DTYPES}")
        if self.rope_scaling_type not in ROPE_SCALING_TYPES:
            problems.append(
                f"rope_scaling_type={self.rope_scaling_type!r} not in {ROPE_SCALING_TYPES}"
            )
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat={self.remat!r} not in {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            problems.append(f"attention={self.attention!r} not in {ATTENTION_IMPLEMENTATIONS}")
        if self.attention_block_q < 0 or self.attention_block_k < 0:
            problems.append("attention block sizes must be >= 0 (0: chosen by shape)")
        if self.global_layer_every < 1:
            problems.append("global_layer_every must be >= 1")
        if problems:
            raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a mapping (e.g. an ml_collections ConfigDict)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown model config keys {unknown}; known keys: {sorted(known)}")
        values = dict(values)
        if "heads" in values:
            values["heads"] = tuple(values["heads"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["heads"] = list(self.heads)
        return values

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_local_layer(self, layer: int) -> bool:
        return self.sliding_window > 0 and (layer + 1) % self.global_layer_every != 0

    @property
    def local_layers(self) -> tuple[bool, ...]:
        return tuple(self.is_local_layer(i) for i in range(self.num_layers))

    def num_params(self) -> int:
        """Parameter count (embeddings included), for FLOP and memory budgets."""
        e, h, k, d, f = (
            self.hidden_dim,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.mlp_dim,
        )
        attn = e * d * (h + 2 * k) + h * d * e
        if self.qkv_bias:
            attn += d * (h + 2 * k)
        norms = (4 if self.sandwich_norms else 2) * e + (2 * d if self.qk_norm else 0)
        per_layer = attn + 3 * e * f + norms
        embed = self.vocab_size * e * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed + e + len(self.heads) * (e + 1)


def tiny_llama(**changes) -> ModelConfig:
    """A Llama-style model small enough for unit tests."""
    return ModelConfig(**changes)


def tiny_gemma3(**changes) -> ModelConfig:
    """A Gemma-3-style model small enough for unit tests (window 4, 2 local : 1 global)."""
    base = dict(
        activation="gelu_tanh",
        qk_norm=True,
        sandwich_norms=True,
        scale_embeddings=True,
        query_pre_attn_scalar=16.0,
        sliding_window=4,
        global_layer_every=3,
        num_layers=3,
        rope_base=1_000_000.0,
        rope_local_base=10_000.0,
        num_kv_heads=1,
    )
    base.update(changes)
    return ModelConfig(**base)


def llama_50m(**changes) -> ModelConfig:
    """The 56M-parameter Llama (512 x 8, vocab 32000) of the training benchmark."""
    base = dict(
        vocab_size=32_000,
        hidden_dim=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=1376,
        tie_embeddings=False,
        norm_eps=1e-5,
    )
    base.update(changes)
    return ModelConfig(**base)


def llama_125m(**changes) -> ModelConfig:
    """The 125M-parameter Llama (768 x 12, GQA 12/4) of the sampling benchmark."""
    base = dict(
        vocab_size=32_000,
        hidden_dim=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        mlp_dim=2048,
        tie_embeddings=False,
        norm_eps=1e-5,
    )
    base.update(changes)
    return ModelConfig(**base)


def gemma3_270m(**changes) -> ModelConfig:
    """google/gemma-3-270m."""
    base = dict(
        vocab_size=262_144,
        hidden_dim=640,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        mlp_dim=2048,
        activation="gelu_tanh",
        qk_norm=True,
        sandwich_norms=True,
        scale_embeddings=True,
        query_pre_attn_scalar=256.0,
        sliding_window=512,
        global_layer_every=6,
        rope_base=1_000_000.0,
        rope_local_base=10_000.0,
        norm_eps=1e-6,
    )
    base.update(changes)
    return ModelConfig(**base)


def llama2_7b(**changes) -> ModelConfig:
    """meta-llama/Llama-2-7b-hf: the study's smaller model (6.7B parameters)."""
    base = dict(
        vocab_size=32_000,
        hidden_dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        mlp_dim=11_008,
        tie_embeddings=False,
        norm_eps=1e-5,
    )
    base.update(changes)
    return ModelConfig(**base)


PRESETS = {
    "tiny_llama": tiny_llama,
    "tiny_gemma3": tiny_gemma3,
    "llama_50m": llama_50m,
    "llama_125m": llama_125m,
    "gemma3_270m": gemma3_270m,
    "llama2_7b": llama2_7b,
}

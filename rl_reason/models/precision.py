"""The mixed-precision policy, stated once.

    what                                       dtype                        set by
    -----------------------------------------  ---------------------------  -------------------------
    master parameters                          float32                      ModelConfig.param_dtype
    optimizer state (Adam moments)             follows the parameters, or   optax; optim.state_dtype
                                               float32 ("float32")
    gradients                                  follows the parameters       sft/ppo steps cast to it
    matmuls: projections, attention products   ModelConfig.dtype            "float32" or "bfloat16"
    residual stream, activations               ModelConfig.dtype
    RMSNorm statistics, RoPE rotation          float32, cast back           layers.RMSNorm, apply_rope
    attention logits and softmax               float32                      dot_product_attention
    output logits                              float32 accumulation; with   Transformer.logits
                                               lm_head_fp32 also float32
                                               inputs (hidden and table)
    log-softmax, log-probs, entropies          float32                      algorithms/logprobs.py
    losses, advantages, KL, corrections        float32                      algorithms/*
    scalar heads (PPO's value)                 float32                      Transformer.scalar_heads
    sampler weights and KV cache               the Sampler's `dtype`        sampling/engine.py
                                               (default: the model's)

The defaults are float32 everywhere: nothing is cast, and the run is what it
was before this module existed. On GPU and TPU set `model.dtype="bfloat16"`
(compute) and keep `param_dtype="float32"` (masters); the sampler may then
run a bfloat16 copy of the weights with a bfloat16 KV cache
(`Sampler(dtype="bfloat16")`) while the learner keeps its own numerics. The
two then score the same tokens differently, and
`algorithms/rollout_correction.py` measures and corrects that gap.

`lm_head_fp32` (TRL's `cast_lm_head_to_fp32`): with bfloat16 compute, the
final norm's output is rounded to bfloat16 before the unembedding, an error
of about 2^-9 relative on every logit input; over a large vocabulary with
large logits that moves log-probs by hundredths of a nat. With the flag the
final norm stays float32 and the unembedding reads float32 hidden states and
a float32 table (the bfloat16 table upcast exactly). It costs a float32
product over the vocabulary (the largest matmul of a small model with a 262k
vocabulary) and matters most for large vocabularies and for the
sampler/learner gap; with float32 compute it changes nothing.

Parameters in bfloat16 (param_dtype="bfloat16") halve the masters' memory
but Adam's moments and updates then round to bfloat16 too. With
`optim.state_dtype="float32"` (`optimizer.float32_state`) the moments and
the update's arithmetic stay float32 and only the final update is rounded:
2 + 8 bytes a parameter instead of 4 + 8 (float32 masters) or 2 + 4 (all
bfloat16). An update below 2^-8 of its weight still vanishes when it is
added to a bfloat16 weight, so keep float32 masters for RL fine-tuning at
small learning rates unless memory forces the choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rl_reason.models.config import ModelConfig
from rl_reason.models.transformer import SCALAR_HEADS


def cast_floating(tree: Any, dtype) -> Any:
    """Every floating-point leaf of `tree` cast to dtype (integer leaves as they are)."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


cast_floating_jit = jax.jit(cast_floating, static_argnums=1)


def sampler_config(config: ModelConfig, dtype: str | None = None) -> ModelConfig:
    """The config a sampler computes with: unrolled layers (decoding), no scalar heads
    (sampling reads only the logits, and a policy with a value head then shares its
    compiled sampler with the model it started from) and, when dtype is given, that
    compute dtype, parameter dtype and KV-cache dtype."""
    changes: dict[str, Any] = {"scan_layers": False, "heads": ()}
    if dtype is not None:
        changes.update(dtype=str(jnp.dtype(dtype)), param_dtype=str(jnp.dtype(dtype)))
    return config.replace(**changes)


def without_heads(params: Any) -> Any:
    """params without the scalar heads' weights (Transformer.scalar_heads), for a
    model built from `sampler_config`; params without heads are returned as they are."""
    inner = params.get("params", {}) if isinstance(params, Mapping) else {}
    if not any(str(k).startswith(SCALAR_HEADS) for k in inner):
        return params
    kept = {k: v for k, v in inner.items() if not str(k).startswith(SCALAR_HEADS)}
    return {**params, "params": kept}


def needs_cast(config: ModelConfig, dtype: str | None) -> bool:
    """Whether a sampler in `dtype` needs a copy of weights stored in config.param_dtype."""
    return dtype is not None and jnp.dtype(dtype) != config.weights_dtype


def sampler_or_learner_below_float32(config: ModelConfig, sampling_dtype: str | None) -> bool:
    """Whether the sampler (at `sampling_dtype`, "" or None: the model's) or the learner
    computes in less than float32: when their log-probs can differ by more than float32
    rounding, so that the mismatch is worth measuring."""
    dtypes = {str(jnp.dtype(d)) for d in (sampling_dtype or config.dtype, config.dtype)}
    return dtypes != {"float32"}


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of `tree`."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def kv_cache_bytes(config: ModelConfig, batch: int, length: int) -> int:
    """Bytes of the keys and values of a KV cache of `batch` rows x `length` slots."""
    per_layer = 2 * batch * config.num_kv_heads * length * config.head_dim
    return config.num_layers * per_layer * config.compute_dtype.itemsize

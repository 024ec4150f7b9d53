"""Transformer building blocks: RMSNorm, RoPE, grouped-query attention, gated MLP.

Every parameter is created with logical axis names (see
rl_reason/parallel/sharding.py for the mapping to mesh axes).
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rl_reason.models.config import ModelConfig

# Finite, so that a query with no visible key gives a uniform softmax, not NaN.
_MASKED_LOGIT = -1e30


def _init(config: ModelConfig, axes: tuple[Optional[str], ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(config.init_std), axes)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 (HF Llama/Gemma convention)."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


def adapted_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """A LoRA-adapted kernel: W + scale * A B (A B in float32, the sum in W's dtype).
    `a` [..., d_in, r], `b` [..., r, d_out], with W's leading (layer) axes, if any."""
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    return kernel + (scale * delta).reshape(kernel.shape).astype(kernel.dtype)


def merge_adapter_factors(variables: dict, scale: float) -> dict:
    """`variables` with every {"kernel", "lora_a", "lora_b"} module as its adapted kernel
    (models/lora.py puts the factors there for `Transformer(adapter_scale=...)`)."""

    def merge(tree):
        if not isinstance(tree, dict):
            return tree
        if "lora_a" in tree:
            rest = {k: v for k, v in tree.items() if k not in ("lora_a", "lora_b")}
            return {
                **rest,
                "kernel": adapted_kernel(tree["kernel"], tree["lora_a"], tree["lora_b"], scale),
            }
        return {k: merge(v) for k, v in tree.items()}

    return merge(dict(variables))


def rope_frequencies(head_dim: int, base: float) -> jax.Array:
    """Inverse frequencies [head_dim // 2] of unscaled RoPE."""
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def global_rope_frequencies(config: ModelConfig) -> jax.Array:
    """The global layers' inverse frequencies with the config's scaling, computed as HF does."""
    inv_freq = rope_frequencies(config.head_dim, config.rope_base)
    factor = config.rope_scaling_factor
    if config.rope_scaling_type == "linear":
        return inv_freq / factor
    low_freq_wavelen = config.rope_original_max_positions / config.rope_low_freq_factor
    high_freq_wavelen = config.rope_original_max_positions / config.rope_high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (config.rope_original_max_positions / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) of shape [batch, length, head_dim], half-split layout as in HF."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates x [batch, length, heads, head_dim] by the tables of rope_tables."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(
    query_positions: jax.Array, key_positions: jax.Array, window: jax.Array
) -> jax.Array:
    """[batch, q_len, k_len] visibility from positions alone.

    A key is visible when it is a real token (position >= 0), not in the
    query's future, and, for sliding-window layers (window > 0), fewer than
    `window` positions behind the query. Working from positions rather than
    indices makes left padding, caches and windows one rule.
    """
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    visible = (k >= 0) & (k <= q)
    return visible & ((window <= 0) | (q - k < window))


def dot_product_attention(q, segments, scale: float) -> jax.Array:
    """Grouped-query attention over several key/value segments with one softmax.

    q: [B, T, H, D] with H a multiple of the K key/value heads. segments: a
    sequence of (k, v, mask) with k [B, K, S, D], v [B, K, D, S] (the KV
    cache's layouts) and mask [B, T, S]; or k [K, S, D], v [K, D, S] without
    the batch axis for keys every row shares (a prompt prefix common to the
    batch: stored once, and its products are one matmul over all rows'
    queries rather than a batch of per-row ones); or k [G, K, S, D], v [G, K,
    D, S] for G < B groups of B / G consecutive rows (the K samples of a
    prompt reading its one prompt cache: one matmul per group). Logits and
    softmax in float32.

    Decoding passes the cache as it was before this step and the new keys as
    separate segments, so that no product reads the updated cache: XLA:CPU
    would otherwise copy the whole cache around its in-place update.
    """
    b, t, h, d = q.shape
    kv_heads = segments[0][0].shape[-3]
    # [B, K, G, T, D]: batch axes first and the contraction minor, the layout XLA:CPU's
    # batched products run fastest from. Left to the einsum, the transpose of
    # [B, T, K, G, D] happened inside the product, 2.3x slower (benchmarks/step_ops.py).
    q = jnp.transpose(q.reshape(b, t, kv_heads, h // kv_heads, d), (0, 2, 3, 1, 4))
    logits = []
    for k, _, mask in segments:
        part = attention_scores(q, k)
        logits.append(jnp.where(mask[:, None, None], part, _MASKED_LOGIT))
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1) * scale, axis=-1)
    out, start = 0.0, 0
    for _, v, _ in segments:
        length = v.shape[-1]
        out += attention_values(probs[..., start : start + length].astype(v.dtype), v)
        start += length
    out = jnp.transpose(out.astype(q.dtype), (0, 3, 1, 2, 4))  # [B, T, K, G, D]
    return out.reshape(b, t, h, d)


_F32 = {"preferred_element_type": jnp.float32}


def attention_scores(q, k):
    """q [B, K, G, T, D] . k [B, K, S, D] (or [K, S, D], or [groups, K, S, D] for groups
    of consecutive rows) -> float32 [B, K, G, T, S].

    A decode step (T == 1) reads the whole cache for a handful of query columns:
    written cache-first, the product XLA:CPU emits streams the cache 1.2-4x
    faster than with the query leading (benchmarks/decode_attention_dots.py).
    """
    if _grouped(q, k):
        part = jnp.einsum("gkmd,gksd->gkms", _by_group(q, k.shape[0]), k, **_F32)
        return _from_groups(part, (*q.shape[:-1], k.shape[2]))
    if q.shape[3] == 1 and k.ndim == 4:
        part = jnp.einsum("bksd,bkgtd->bksgt", k, q, **_F32)
        return jnp.moveaxis(part, 2, -1)
    spec = "bkgtd,bksd->bkgts" if k.ndim == 4 else "bkgtd,ksd->bkgts"
    return jnp.einsum(spec, q, k, **_F32)


def attention_values(probs, v):
    """probs [B, K, G, T, S] . v [B, K, D, S] (or [K, D, S], or [groups, K, D, S])
    -> float32 [B, K, G, T, D];
    cache-first in a decode step, as `attention_scores`."""
    if _grouped(probs, v):
        part = jnp.einsum("gkms,gkds->gkmd", _by_group(probs, v.shape[0]), v, **_F32)
        return _from_groups(part, (*probs.shape[:-1], v.shape[2]))
    if probs.shape[3] == 1 and v.ndim == 4:
        part = jnp.einsum("bkds,bkgts->bkdgt", v, probs, **_F32)
        return jnp.moveaxis(part, 2, -1)
    spec = "bkgts,bkds->bkgtd" if v.ndim == 4 else "bkgts,kds->bkgtd"
    return jnp.einsum(spec, probs, v, **_F32)


def _grouped(x, kv) -> bool:
    """Whether kv [G, K, ., .] is held by groups of x's [B, ...] rows (G < B)."""
    return kv.ndim == 4 and kv.shape[0] != x.shape[0]


def _by_group(x, groups: int):
    """[B, K, G', T, X] -> [groups, K, (B / groups) G' T, X]: a group's rows' queries
    (or probabilities) side by side, one matmul against the group's keys (or values)."""
    b, kh, g, t, last = x.shape
    x = x.reshape(groups, b // groups, kh, g, t, last)
    return jnp.moveaxis(x, 1, 2).reshape(groups, kh, -1, last)


def _from_groups(x, shape):
    """Inverse of `_by_group` for a result [groups, K, (B / groups) G' T, Y] -> shape."""
    b, kh, g, t, last = shape
    groups = x.shape[0]
    x = x.reshape(groups, kh, b // groups, g, t, last)
    return jnp.moveaxis(x, 2, 1).reshape(shape)


def cpu_layout() -> bool:
    """Whether projections take `cpu_matmul`'s path (traced for the CPU backend)."""
    return jax.default_backend() == "cpu"


@jax.custom_vjp
def cpu_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N, I] @ w [I, O], with a backward pass laid out for XLA:CPU.

    The weight gradient x^T @ dy contracts over the token axis N, the major
    axis of both operands. XLA:CPU's products want the contraction minor, and
    left to itself it fused a transpose of the wider operand into the
    elementwise backward work producing it (SwiGLU's, RoPE's), a strided
    write at about 1 GB/s: 16% of the small default-job model's training
    step. Here the narrower operand is transposed on its own (a tiled copy)
    and the product runs plain; the values are the same product's.
    """
    return x @ w


def _cpu_matmul_fwd(x, w):
    return x @ w, (x, w)


def _cpu_matmul_bwd(residuals, dy):
    x, w = residuals
    barrier = jax.lax.optimization_barrier  # keeps the transpose out of the producer's fusion
    if x.shape[1] <= dy.shape[1]:
        dw = barrier(x.T) @ dy
    else:
        dw = (barrier(dy.T) @ x).T  # a transpose of [O, I]: the size of the weight
    return dy @ w.T, dw


cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


class Projection(nn.Module):
    """x[..., *in_dims] @ kernel[*in_dims, *out_dims] (+ bias), logically partitioned.

    One product over one named kernel, so that checkpoint conversion sees
    the same layout the model computes with: an einsum, or on CPU the kernel
    and input flattened to matrices for `cpu_matmul`'s backward pass.
    """

    in_axes: tuple[str, ...]
    out_shape: tuple[int, ...]
    out_axes: tuple[Optional[str], ...]
    config: ModelConfig
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.config
        n_in = len(self.in_axes)
        kernel = self.param(
            "kernel",
            _init(c, self.in_axes + self.out_axes),
            x.shape[x.ndim - n_in :] + self.out_shape,
            c.weights_dtype,
        )
        x, kernel = x.astype(c.compute_dtype), kernel.astype(c.compute_dtype)
        if cpu_layout():
            lead, width = x.shape[: x.ndim - n_in], math.prod(kernel.shape[:n_in])
            y = cpu_matmul(x.reshape(-1, width), kernel.reshape(width, -1))
            y = y.reshape(*lead, *self.out_shape)
        else:
            letters = "abcdefgh"
            x_sub = "..." + letters[:n_in]
            k_sub = letters[:n_in] + letters[n_in : n_in + len(self.out_shape)]
            y = jnp.einsum(f"{x_sub},{k_sub}->...{k_sub[n_in:]}", x, kernel)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.out_axes),
                self.out_shape,
                c.weights_dtype,
            )
            y = y + bias.astype(c.compute_dtype)
        return y


class Attention(nn.Module):
    """Projections, optional QK-norm and RoPE; attention runs in the caller's context."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.q_proj = Projection(
            ("embed",), (c.num_heads, c.head_dim), ("heads", "head_dim"), c, c.qkv_bias
        )
        self.k_proj = Projection(
            ("embed",), (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), c, c.qkv_bias
        )
        self.v_proj = Projection(
            ("embed",), (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), c, c.qkv_bias
        )
        self.o_proj = Projection(("heads", "head_dim"), (c.hidden_dim,), ("embed",), c)
        if c.qk_norm:
            norm = dict(eps=c.norm_eps, dtype=c.compute_dtype, param_dtype=c.weights_dtype)
            self.q_norm = RMSNorm(**norm)
            self.k_norm = RMSNorm(**norm)

    def project(self, x, sin, cos):
        """Returns rotated queries, rotated keys and values for x [B, T, E]."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, sin, cos), apply_rope(k, sin, cos), v

    def output(self, attended):
        return self.o_proj(attended)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU for Llama, GeGLU (tanh GELU) for Gemma."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = Projection(("embed",), (c.mlp_dim,), ("mlp",), c, name="gate_proj")(x)
        up = Projection(("embed",), (c.mlp_dim,), ("mlp",), c, name="up_proj")(x)
        if c.activation == "silu":
            gate = jax.nn.silu(gate)
        else:
            gate = jax.nn.gelu(gate, approximate=True)
        return Projection(("mlp",), (c.hidden_dim,), ("embed",), c, name="down_proj")(gate * up)

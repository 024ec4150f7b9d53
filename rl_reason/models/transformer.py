"""The decoder-only transformer: scanned or unrolled layers, a static-shape KV cache, heads.

Training scans the layers over stacked parameters (`scan_layers=True`: compile
time does not grow with depth). Decoding unrolls them (`scan_layers=False`):
inside a decode loop, slicing one layer's weights and cache out of a stack
every step costs a copy that the unrolled layout avoids. `stack_layers` and
`unstack_layers` convert parameters between the two layouts.

The KV cache is an explicit pytree argument rather than a mutable Flax
collection, so that `forward(params, ..., cache) -> (output, cache)` stays a
pure function the sampler can carry through `lax.while_loop`.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from rl_reason.models import attention, layers
from rl_reason.models.config import ModelConfig

# Values are stored transposed. XLA:CPU's batched matmul wants the contracted
# dimension minor in both operands; attention contracts keys over head_dim
# and values over length, so with these layouts each product reads the cache
# as stored instead of transposing a whole layer's values every decode step.
KEY_CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")
VALUE_CACHE_AXES = ("batch", "kv_heads", "head_dim", "length")

# Scalar head `name`'s Dense params sit under `f"{SCALAR_HEADS}_{name}"` (flax names a
# dict attribute's entries so): what LoRA trains beside its adapters, what the ORM adds,
# what a sampler leaves out.
SCALAR_HEADS = "scalar_heads"


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, and the position held in each slot.

    k: per layer [batch, kv_heads, max_length, head_dim]; v: per layer
    [batch, kv_heads, head_dim, max_length]; each stacked into one
    [layers, ...] array for a scanned model or a tuple of arrays for an
    unrolled one. positions: [batch, max_length], -1 for empty or padded
    slots. index: the next slot to write; every row of the batch writes the
    same slot, which left padding makes possible. Slots from index on must be
    empty (-1): a call attends to the cache as it was and to its new keys
    separately, so a stale key there would be seen besides its replacement.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    positions: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_length: int) -> "KVCache":
        key_shape = (batch, config.num_kv_heads, max_length, config.head_dim)
        value_shape = (batch, config.num_kv_heads, config.head_dim, max_length)
        if config.scan_layers:
            zeros = lambda shape: jnp.zeros((config.num_layers, *shape), config.compute_dtype)
        else:
            zeros = lambda shape: tuple(
                jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers)
            )
        return cls(
            k=zeros(key_shape),
            v=zeros(value_shape),
            positions=jnp.full((batch, max_length), -1, jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.positions.shape[1]

    def take_rows(self, rows: jax.Array) -> "KVCache":
        """The cache whose row i is this one's row rows[i] (rows [B'] int)."""
        stacked = not isinstance(self.k, tuple)  # [layers, batch, ...]
        take = lambda x: jnp.take(x, rows, axis=1 if stacked else 0)
        per_layer = take if stacked else (lambda x: tuple(map(take, x)))
        return self.replace(
            k=per_layer(self.k), v=per_layer(self.v), positions=jnp.take(self.positions, rows, 0)
        )


@flax.struct.dataclass
class PagedKV:
    """A pool of fixed-size KV pages and each row's page table (sampling/continuous.py).

    k, v: per layer [num_pages, page_size, kv_heads, head_dim], a tuple (the
    paged path runs the unrolled model). page_table [B, P]: row b's token at
    sequence index i (its position: rows hold no padding) lives in page
    page_table[b, i // page_size] at offset i % page_size. Page 0 belongs to
    no row: padding tokens write there and unused table entries point there.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    page_table: jax.Array

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    def slots(self, key_positions: jax.Array) -> jax.Array:
        """[B, T] each token's slot in the flattened pool (page 0's first for padding, -1)."""
        index = jnp.maximum(key_positions, 0)
        page = jnp.take_along_axis(self.page_table, index // self.page_size, axis=1)
        return jnp.where(key_positions >= 0, page * self.page_size + index % self.page_size, 0)


@flax.struct.dataclass
class TransformerOutput:
    hidden: jax.Array  # [B, T, E], after the final norm
    cache: Optional[KVCache]
    heads: dict[str, jax.Array]  # name -> [B, T] float32


@flax.struct.dataclass
class _LayerContext:
    """What every layer shares: positions, RoPE tables and the cache write slot."""

    query_positions: jax.Array
    key_positions: jax.Array  # [B, T] of the new tokens, -1 for padding
    cached_key_positions: Optional[jax.Array]  # [B, S] of the cache before this call
    rope_global: tuple[jax.Array, jax.Array]
    rope_local: tuple[jax.Array, jax.Array]
    cache_index: Optional[jax.Array]
    shared_key_positions: Optional[jax.Array]  # [1, P] of the shared cache, if any
    group_key_positions: Optional[jax.Array] = None  # [B, P] of the group cache, if any
    page_table: Optional[jax.Array] = None  # [B, P] with a PagedKV
    page_slots: Optional[jax.Array] = None  # [B, T] the new tokens' slots in the flat pool


class Block(nn.Module):
    """One pre-norm (optionally sandwich-norm) attention + MLP layer."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, layer, ctx: _LayerContext):
        """x [B, T, E]; layer: {"is_local", "kv": this layer's (k, v) cache or None,
        "shared_kv": this layer's (k, v) of a batch-1 cache every row attends to, or None,
        "group_kv": this layer's (k, v) of a G-row cache, row r's that of B / G rows each}."""
        c = self.config
        norm = lambda name: layers.RMSNorm(c.norm_eps, c.compute_dtype, c.weights_dtype, name=name)
        attn = layers.Attention(c, name="attn")

        is_local = layer["is_local"]
        sin = jnp.where(is_local, ctx.rope_local[0], ctx.rope_global[0])
        cos = jnp.where(is_local, ctx.rope_local[1], ctx.rope_global[1])
        q, k, v = attn.project(norm("pre_attn_norm")(x), sin, cos)
        window = jnp.where(is_local, c.sliding_window, 0)
        if layer.get("pages") is not None:
            attended, kv = self._paged_attention(q, k, v, window, layer["pages"], ctx)
            return self._output_and_mlp(x, attn, attended), kv
        k = jnp.swapaxes(k, 1, 2)  # [B, K, T, D], the cache's layouts
        v = jnp.transpose(v, (0, 2, 3, 1))  # [B, K, D, T]
        segments = [(k, v, ctx.key_positions)]  # the new tokens
        kv = layer["kv"]
        if kv is not None:
            segments.insert(0, (*kv, ctx.cached_key_positions))
        if layer.get("group_kv") is not None:  # [G, ...]: read by each group's rows in place
            segments.insert(0, (*layer["group_kv"], ctx.group_key_positions))
        if layer["shared_kv"] is not None:
            shared_k, shared_v = layer["shared_kv"]
            segments.insert(0, (shared_k[0], shared_v[0], ctx.shared_key_positions))
        attended = attention.attend(
            q,
            segments,
            c.query_scale,
            query_positions=ctx.query_positions,
            window=window,
            implementation=c.attention,
            block_q=c.attention_block_q,
            block_k=c.attention_block_k,
            sliding_window=c.sliding_window,
        )
        if kv is not None:
            # Write the cache after attention has read it, an order made explicit
            # by the new keys depending on the output (+ 0 x one value per row
            # and KV head): XLA then updates the cache in place. Without it, its
            # copy insertion copied every cache buffer twice per decode step (an
            # optimization barrier does not order them).
            b, t = attended.shape[:2]
            after = 0.0 * attended.reshape(b, t, c.num_kv_heads, -1)[..., :1]
            after = jnp.swapaxes(after, 1, 2)  # [B, K, T, 1]
            k, v = k + after, v + jnp.swapaxes(after, 2, 3)
            cached_k, cached_v = kv
            index = ctx.cache_index
            kv = (
                jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), (0, 0, index, 0)),
                jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), (0, 0, 0, index)),
            )
        return self._output_and_mlp(x, attn, attended), kv

    def _output_and_mlp(self, x, attn, attended):
        """The attention's output projection and residual, then the MLP's."""
        c = self.config
        norm = lambda name: layers.RMSNorm(c.norm_eps, c.compute_dtype, c.weights_dtype, name=name)
        h = attn.output(attended)
        if c.sandwich_norms:
            h = norm("post_attn_norm")(h)
        x = x + h
        h = layers.GatedMLP(c, name="mlp")(norm("pre_mlp_norm")(x))
        if c.sandwich_norms:
            h = norm("post_mlp_norm")(h)
        return nn.with_logical_constraint(x + h, ("batch", "length", "act_embed"))

    def _paged_attention(self, q, k, v, window, pages, ctx):
        """Paged: the new keys and values [B, T, K, D] written into the pool first, then
        every query attends over its row's pages. Returns (attended, the pool)."""
        c = self.config
        slots = ctx.page_slots.reshape(-1)

        def write(pool, new):
            flat = pool.reshape(-1, *pool.shape[2:])
            new = new.reshape(-1, *pool.shape[2:]).astype(pool.dtype)
            return flat.at[slots].set(new).reshape(pool.shape)

        k_pool, v_pool = write(pages[0], k), write(pages[1], v)
        attended = attention.paged_attention(
            q,
            k_pool,
            v_pool,
            ctx.page_table,
            c.query_scale,
            query_positions=ctx.key_positions,
            window=window,
            block_tokens=c.attention_block_k or attention.PAGED_BLOCK_TOKENS,
        )
        return attended, (k_pool, v_pool)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    """Decoder-only LM. `__call__` returns final hidden states; `logits` unembeds them.

    Keeping the unembedding separate lets losses chunk it over the sequence so
    that [batch, length, vocab] logits never exist at once (a 262k vocabulary).
    """

    config: ModelConfig
    # LoRA (models/lora.py): > 0 reads factors "lora_a", "lora_b" stored beside the
    # layers' kernels and uses W + adapter_scale * A B inside each (rematerialised)
    # block, so that the adapted kernels and their gradients exist one layer at a time.
    adapter_scale: float = 0.0

    def setup(self):
        c = self.config
        self.embedder = nn.Embed(
            c.vocab_size,
            c.hidden_dim,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(c.init_std), ("vocab", "embed")
            ),
            dtype=c.compute_dtype,
            param_dtype=c.weights_dtype,
        )
        block = Block
        if self.adapter_scale:
            merge = functools.partial(layers.merge_adapter_factors, scale=self.adapter_scale)
            block = nn.map_variables(block, "params", trans_in_fn=merge, mutable=False)
        if c.remat != "none":
            block = nn.remat(block, prevent_cse=False, policy=_REMAT_POLICIES[c.remat])
        if c.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c)
        else:
            self.layers = [block(c) for _ in range(c.num_layers)]
        # With lm_head_fp32 the final norm's float32 result is not rounded to the
        # compute dtype, and `logits` then multiplies in float32 (precision.py).
        norm_dtype = jnp.float32 if c.lm_head_fp32 else c.compute_dtype
        self.final_norm = layers.RMSNorm(c.norm_eps, norm_dtype, c.weights_dtype)
        if not c.tie_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(
                    nn.initializers.normal(c.init_std), ("embed", "vocab")
                ),
                (c.hidden_dim, c.vocab_size),
                c.weights_dtype,
            )
        self.scalar_heads = {  # params: SCALAR_HEADS + "_" + name
            name: nn.Dense(
                1,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(c.init_std), ("embed", None)
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                dtype=jnp.float32,
                param_dtype=c.weights_dtype,
            )
            for name in c.heads
        }

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        input_mask: Optional[jax.Array] = None,
        cache: Optional[KVCache] = None,
        shared: Optional[KVCache] = None,
        paged: Optional[PagedKV] = None,
        groups: Optional[KVCache] = None,
    ) -> TransformerOutput:
        """Runs the layers over tokens [B, T] at positions [B, T].

        input_mask marks real tokens (False for padding). With a cache, the T new
        tokens are written at slot cache.index and attend to everything cached.
        `shared` is a batch-1 cache (a prompt prefix common to all rows) that
        every row also attends to without holding a copy; it is only read.
        `groups` is a cache of G rows read the same way by groups of B / G
        consecutive rows (row r reads its row r // (B / G): the K samples of a
        prompt decoding over their prompt's one cache).
        With `paged` instead of a cache, each row's new tokens are written into
        its pages at their positions and attend to the row's pages; the output's
        cache is then the PagedKV with the pool updated.
        """
        c = self.config
        if input_mask is None:
            input_mask = jnp.ones(tokens.shape, bool)
        key_positions = jnp.where(input_mask, positions, -1).astype(jnp.int32)
        kv = None if cache is None else (cache.k, cache.v)

        x = self.embedder(tokens)
        if c.scale_embeddings:
            x = x * jnp.asarray(c.hidden_dim**0.5, c.compute_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        ctx = self._layer_context(positions, key_positions, cache, shared, paged, groups)
        if paged is not None:
            kv = (paged.k, paged.v)
        if c.scan_layers:
            per_layer = {
                "is_local": jnp.asarray(c.local_layers, bool),
                "kv": kv,
                "shared_kv": None if shared is None else (shared.k, shared.v),
                "group_kv": None if groups is None else (groups.k, groups.v),
            }
            x, kv = self.layers(x, per_layer, ctx)
        else:
            new_kv = []
            for i, block in enumerate(self.layers):
                layer_kv = None if kv is None else (kv[0][i], kv[1][i])
                layer = {
                    "is_local": c.local_layers[i],
                    "kv": None if paged is not None else layer_kv,
                    "pages": layer_kv if paged is not None else None,
                    "shared_kv": None if shared is None else (shared.k[i], shared.v[i]),
                    "group_kv": None if groups is None else (groups.k[i], groups.v[i]),
                }
                x, layer_kv = block(x, layer, ctx)
                new_kv.append(layer_kv)
            if kv is not None:
                kv = tuple(zip(*new_kv))
        hidden = self.final_norm(x)

        if paged is not None:
            cache = paged.replace(k=kv[0], v=kv[1])
        elif cache is not None:
            cache = KVCache(
                k=kv[0],
                v=kv[1],
                positions=jax.lax.dynamic_update_slice(
                    cache.positions, key_positions, (0, cache.index)
                ),
                index=cache.index + tokens.shape[1],
            )
        heads = {
            name: head(hidden.astype(jnp.float32))[..., 0]
            for name, head in self.scalar_heads.items()
        }
        return TransformerOutput(hidden=hidden, cache=cache, heads=heads)

    def _layer_context(
        self, positions, key_positions, cache, shared, paged, groups
    ) -> _LayerContext:
        """What every layer shares: positions, RoPE tables, where the cache is written."""
        c = self.config
        rope_global = layers.rope_tables(positions, layers.global_rope_frequencies(c))
        rope_local = (
            layers.rope_tables(positions, layers.rope_frequencies(c.head_dim, c.rope_local_base))
            if any(c.local_layers)
            else rope_global
        )
        group_key_positions = None
        if groups is not None:  # each group's rows see its keys' positions
            rows, count = positions.shape[0], groups.positions.shape[0]
            if rows % count:
                raise ValueError(
                    f"{rows} rows cannot read a cache of {count} groups: each group's rows"
                    " must be as many and consecutive."
                )
            group_key_positions = jnp.repeat(groups.positions, rows // count, axis=0)
        ctx = _LayerContext(
            query_positions=positions,
            key_positions=key_positions,
            cached_key_positions=None if cache is None else cache.positions,
            rope_global=rope_global,
            rope_local=rope_local,
            cache_index=None if cache is None else cache.index,
            shared_key_positions=None if shared is None else shared.positions,
            group_key_positions=group_key_positions,
        )
        if paged is None:
            return ctx
        if c.scan_layers or cache is not None or shared is not None or groups is not None:
            raise ValueError("A PagedKV needs the unrolled model and no other cache.")
        return ctx.replace(page_table=paged.page_table, page_slots=paged.slots(key_positions))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Unembeds hidden [..., E] into float32 logits [..., V].

        The table is cast to the hidden states' dtype: the compute dtype, or
        float32 with lm_head_fp32 (the final norm's output is then float32).
        """
        if self.config.lm_head_fp32:
            hidden = hidden.astype(jnp.float32)
        if self.config.tie_embeddings:
            table = self.embedder.embedding
            return jnp.einsum(
                "...e,ve->...v",
                hidden,
                table.astype(hidden.dtype),
                preferred_element_type=jnp.float32,
            )
        return jnp.einsum(
            "...e,ev->...v",
            hidden,
            self.lm_head.astype(hidden.dtype),
            preferred_element_type=jnp.float32,
        )


def init_params(model: Transformer, rng: jax.Array) -> dict:
    """`model`'s params, boxed with their logical axis names (from a 2-token dummy input).

    Under `jax.eval_shape` this gives shapes and names without allocating:
    what shardings and restore targets are built from.
    """
    tokens = jnp.zeros((1, 2), jnp.int32)
    return model.init(rng, tokens, jnp.zeros_like(tokens))


def unstack_layers(params: dict) -> dict:
    """Scanned layout (params/layers with a leading layer axis) -> layers_0, layers_1, ..."""
    inner = dict(params["params"])
    stacked = inner.pop("layers")
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        inner[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "params": inner}


def stack_layers(params: dict) -> dict:
    """Unrolled layout (layers_0, layers_1, ...) -> scanned layout (params/layers)."""
    inner = dict(params["params"])
    names = sorted((k for k in inner if k.startswith("layers_")), key=lambda k: int(k[7:]))
    per_layer = [inner.pop(name) for name in names]
    inner["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return {**params, "params": inner}


def default_positions(input_mask: jax.Array) -> jax.Array:
    """Positions counting real tokens only, so left padding starts each row at 0."""
    return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=-1) - 1, 0)

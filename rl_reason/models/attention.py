"""Attention kernels and the one place that picks among them by backend.

`attend(q, segments, scale, query_positions=..., window=...)` is what the
transformer calls. Its segments are (k, v, key_positions) with the KV cache's
layouts (k [B, K, S, D], v [B, K, D, S], or without the batch axis for a
prefix every row shares, or [G, K, ...] for a prompt each group of B / G
consecutive rows shares; key_positions [B or 1, S], -1 for an empty or padded
slot), and visibility is `layers.attention_mask`'s rule: a key is seen when it
is real, not in the query's future and, when window > 0, fewer than `window`
positions behind. Implementations:

- "xla": `layers.dot_product_attention`, the dense one: float32 logits and
  softmax [B, K, G, T, S] materialised (the fastest at short lengths on CPU).
- "blockwise": FlashAttention's algorithm in JAX. Queries in blocks of
  `block_q`, keys in blocks of `block_k`, an online softmax (running max and
  sum) in float32, blocks that no query of the block can see skipped at run
  time, and a custom VJP that recomputes each block's probabilities from the
  saved log-sum-exp instead of storing them: memory linear in the length.
  Every segment is reduced on its own to a partial softmax (max, sum,
  weighted values) and the partials are merged at the end (split-K), so the
  decode step reads the cache in chunks, skips the chunks not yet written,
  and never materialises logits over the whole cache.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` on GPU,
  the segments concatenated and the visibility passed as its boolean mask.
- "splash": the Pallas TPU splash-attention kernel, for self-attention over
  one segment (training and a prefill without cache); see `splash_attention`.
- "auto": by backend, see `choose_implementation`.

A query that sees no key at all (a padding row) gets the mean of every value,
as the dense softmax over uniformly masked logits gives, never a NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from rl_reason.models import layers

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")

# CPU block sizes (benchmarks/attention.py ops measures them): 128 x 128 up to
# 2,048 keys, 256 x 256 from there; logits blocks of 64-256 KiB stay in cache.
CPU_BLOCK_SMALL = 128
CPU_BLOCK_LARGE = 256
CPU_LARGE_FROM_KEYS = 2048
# Decode (at most DECODE_MAX_QUERIES queries): the cache is read in chunks of this many slots.
DECODE_BLOCK_K = 1024
DECODE_MAX_QUERIES = 16
# "auto" on CPU keeps the dense attention where the blockwise one was not
# clearly faster (BENCHMARKS.md, "Attention kernels"): up to 256 keys in
# training and prefill (the SFT step measured 1.05-1.12x at 128 keys, 0.95-1.10x
# at 256, 1.84-2.26x at 512), up to DECODE_BLOCK_K cache slots for a few queries
# (one chunk: a tie), and at every length for one query a row (a decode step):
# its scratch is [B, H, S], linear in the cache, and with the cache-first
# products (layers.attention_scores) it ran 1.6-2.7x the blockwise kernel's
# speed at 4,096 and 16,384 slots, with a tenth to nine tenths of the cache
# written (benchmarks/attention.py decode --written 0.1,0.5,0.9).
AUTO_DENSE_MAX_KEYS = 256
AUTO_DENSE_MAX_DECODE_KEYS = DECODE_BLOCK_K

Segment = tuple  # (k, v, key_positions)


# --- choosing --------------------------------------------------------------------


def choose_implementation(
    implementation: str, q_len: int, kv_len: int, dtype, num_segments: int = 1
) -> str:
    """The implementation "auto" (or a forced one) resolves to for these shapes.

    GPU: cuDNN's fused kernel for prefill and training in bfloat16/float16
    (it takes no float32), the blockwise one otherwise (decode, float32).
    TPU: splash attention for self-attention over one segment whose length
    is a multiple of 128, the blockwise one otherwise (decode, prefill with a
    cache, other lengths).
    CPU: the dense XLA attention for one query a row and up to
    AUTO_DENSE_MAX_KEYS keys (a few queries: AUTO_DENSE_MAX_DECODE_KEYS),
    blockwise above.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r} not in {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "gpu":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if half and q_len > 1 else "blockwise"
    if backend == "tpu":
        self_attention = num_segments == 1 and q_len == kv_len and q_len % 128 == 0
        return "splash" if self_attention else "blockwise"
    dense_max = AUTO_DENSE_MAX_DECODE_KEYS if q_len <= DECODE_MAX_QUERIES else AUTO_DENSE_MAX_KEYS
    return "xla" if q_len == 1 or kv_len <= dense_max else "blockwise"


def block_sizes(q_len: int, kv_len: int, block_q: int = 0, block_k: int = 0) -> tuple[int, int]:
    """(block_q, block_k) for these lengths: the given ones, else the defaults by shape.

    Decode (a few queries) reads the cache in DECODE_BLOCK_K chunks; otherwise
    square blocks of CPU_BLOCK_SMALL, or CPU_BLOCK_LARGE from
    CPU_LARGE_FROM_KEYS keys; each cut to the length when shorter.
    """
    if q_len <= DECODE_MAX_QUERIES:
        default_q, default_k = q_len, DECODE_BLOCK_K
    elif kv_len >= CPU_LARGE_FROM_KEYS:
        default_q = default_k = CPU_BLOCK_LARGE
    else:
        default_q = default_k = CPU_BLOCK_SMALL
    block_q, block_k = block_q or default_q, block_k or default_k
    return max(1, min(block_q, q_len)), max(1, min(block_k, kv_len))


# --- the dispatch point ----------------------------------------------------------------


def attend(
    q: jax.Array,
    segments: Sequence[Segment],
    scale: float,
    *,
    query_positions: jax.Array,
    window: jax.Array | int = 0,
    implementation: str = "auto",
    block_q: int = 0,
    block_k: int = 0,
    sliding_window: int = 0,
) -> jax.Array:
    """Grouped-query attention of q [B, T, H, D] over segments (k, v, key_positions).

    sliding_window: the static window of local layers (the splash kernel's
    masks are static; `window` is what this layer uses, possibly traced).

    See the module docstring for the layouts and the implementations.
    """
    kv_len = sum(k.shape[-2] for k, _, _ in segments)
    impl = choose_implementation(implementation, q.shape[1], kv_len, q.dtype, len(segments))
    if impl != "xla":  # only the dense products read a grouped segment in place
        segments = [_rows_of_groups(segment, q.shape[0]) for segment in segments]
    if impl == "xla":
        masked = [
            (k, v, layers.attention_mask(query_positions, pos, window)) for k, v, pos in segments
        ]
        return layers.dot_product_attention(q, masked, scale)
    if impl == "cudnn":
        return cudnn_attention(q, segments, scale, query_positions, window)
    if impl == "splash":
        return splash_attention(
            q, segments, scale, query_positions, window, sliding_window=sliding_window
        )
    bq, bk = block_sizes(q.shape[1], max(k.shape[-2] for k, _, _ in segments), block_q, block_k)
    return blockwise_attention(q, segments, scale, query_positions, window, bq, bk)


def _rows_of_groups(segment: Segment, rows: int) -> Segment:
    """A segment held by groups of consecutive rows (k [G, K, S, D], G < rows) with its
    keys and values repeated for each row; any other segment as it is."""
    k, v, positions = segment
    if k.ndim == 4 and k.shape[0] != rows:
        k, v = (jnp.repeat(x, rows // k.shape[0], axis=0) for x in (k, v))
    return k, v, positions


# --- blockwise: forward ----------------------------------------------------------


def _visible(qpos, kpos, window):
    """[B, tq, s] visibility of key positions kpos [B or 1, s] from qpos [B, tq]."""
    return layers.attention_mask(qpos, kpos, window)


def _kslice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _segment_parts(k, v, kpos):
    """Axis of the length in k and v, and the backward products' einsum specs, for a batched
    or shared segment (q.K and p.V are `layers.attention_scores` and `attention_values`)."""
    shared = k.ndim == 3
    b = "" if shared else "b"
    return dict(
        k_axis=k.ndim - 2,
        v_axis=v.ndim - 1,
        dq=f"bkgts,{b}ksd->bkgtd",
        dk=f"bkgts,bkgtd->{b}ksd",
        dv=f"bkgts,bkgtd->{b}kds",
        dp=f"bkgtd,{b}kds->bkgts",
        shared=shared,
    )


def _block_spans(length: int, block: int) -> tuple[int, int]:
    """(number of full blocks, size of the tail block or 0)."""
    return length // block, length % block


def _segment_forward(qb, qpos, k, v, kpos, window, scale, block_k):
    """One segment's partial softmax for a query block qb [B, K, G, tq, D].

    Returns (m, l, acc): the running max [B, K, G, tq] (-inf where nothing
    was visible), the sum of exp(logit - m) and the weighted values
    [B, K, G, tq, D], all float32.
    """
    p = _segment_parts(k, v, kpos)
    s_len = k.shape[p["k_axis"]]
    bsz, kh, g, tq, d = qb.shape
    init = (
        jnp.full((bsz, kh, g, tq), -jnp.inf, jnp.float32),
        jnp.zeros((bsz, kh, g, tq), jnp.float32),
        jnp.zeros((bsz, kh, g, tq, d), jnp.float32),
    )

    def block(carry, start, size):
        kb = _kslice(k, start, size, p["k_axis"])
        vb = _kslice(v, start, size, p["v_axis"])
        pos = _kslice(kpos, start, size, 1)
        mask = _visible(qpos, pos, window)  # [B, tq, s]

        def compute(carry):
            s = layers.attention_scores(qb, kb) * scale  # cache-first for one query
            s = jnp.where(mask[:, None, None], s, -jnp.inf)

            def weigh(probs):
                return layers.attention_values(probs.astype(vb.dtype), vb)

            return _online_softmax(carry, s, weigh)

        return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry)

    return _over_key_blocks(block, init, s_len, block_k)


def _online_softmax(carry, s, weigh):
    """Folds one block of logits s (-inf where unseen) into the running (max, sum of
    exp(logit - max), weighted values), all float32; `weigh(probs)` is the block's
    probabilities [B, K, G, tq, s] times its values, [B, K, G, tq, D] in float32."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    probs = jnp.exp(s - m_safe[..., None])
    return m_new, alpha * l + jnp.sum(probs, axis=-1), alpha[..., None] * acc + weigh(probs)


def _over_key_blocks(block, carry, s_len: int, block_k: int):
    """`block(carry, start, size)` over the keys in blocks of block_k: the whole blocks in
    a loop (inline when there is one), then the shorter tail."""
    full, tail = _block_spans(s_len, block_k)
    if full == 1:
        carry = block(carry, 0, block_k)
    elif full > 1:
        carry = jax.lax.fori_loop(0, full, lambda i, c: block(c, i * block_k, block_k), carry)
    if tail:
        carry = block(carry, full * block_k, tail)
    return carry


def _merge(parts):
    """One softmax from the segments' partials: (m, l, acc) -> (lse, l, acc / l)."""
    m = functools.reduce(jnp.maximum, [part[0] for part in parts])
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    l, acc = 0.0, 0.0
    for pm, pl, pacc in parts:
        alpha = jnp.exp(pm - m_safe)
        l = l + alpha * pl
        acc = acc + alpha[..., None] * pacc
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
    return lse, seen, out


def _value_mean(segments):
    """[B or 1, K, D] mean of every value of every segment (float32): what a query
    seeing no key gets, as the dense softmax over uniformly masked logits."""
    total = sum(v.shape[-1] for _, v, _ in segments)
    mean = 0.0
    for _, v, _ in segments:
        s = jnp.sum(v.astype(jnp.float32), axis=-1)
        mean = mean + (s if v.ndim == 4 else s[None])
    return mean / total


def _to_blocks(q, qpos, kv_heads, block_q):
    """q [B, T, H, D] -> [nq, B, K, G, bq, D] and positions [nq, B, bq], padded with -1."""
    b, t, h, d = q.shape
    nq = -(-t // block_q)
    pad = nq * block_q - t
    q = jnp.transpose(q.reshape(b, t, kv_heads, h // kv_heads, d), (0, 2, 3, 1, 4))
    if pad:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
        qpos = jnp.pad(qpos, ((0, 0), (0, pad)), constant_values=-1)
    q = q.reshape(b, kv_heads, h // kv_heads, nq, block_q, d)
    return jnp.moveaxis(q, 3, 0), jnp.moveaxis(qpos.reshape(b, nq, block_q), 1, 0)


def _from_blocks(x, t):
    """[nq, B, K, G, bq, D] -> [B, T, H, D] (float32 kept)."""
    nq, b, kh, g, bq, d = x.shape
    x = jnp.moveaxis(x, 0, 3).reshape(b, kh, g, nq * bq, d)[:, :, :, :t]
    return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(b, t, kh * g, d)


def _map_blocks(fn, *xs):
    """fn over the leading (query block) axis: a direct call for one block, else lax.map."""
    if xs[0].shape[0] == 1:
        return jax.tree.map(lambda y: y[None], fn(*(x[0] for x in xs)))
    return jax.lax.map(lambda args: fn(*args), xs)


def _forward(q, segments, scale, qpos, window, block_q, block_k):
    """(out [B, T, H, D] in q's dtype, residuals for the backward pass)."""
    kv_heads = segments[0][0].shape[-3]
    qb, qposb = _to_blocks(q, qpos, kv_heads, block_q)

    def one(qblock, pos):
        parts = [
            _segment_forward(qblock, pos, k, v, kpos, window, scale, block_k)
            for k, v, kpos in segments
        ]
        lse, _, out = _merge(parts)
        return out, lse

    out, lse = _map_blocks(one, qb, qposb)
    # Queries that saw nothing take the mean of every value, read only when
    # there are some (a decode step would otherwise read the whole cache).
    seen = jnp.isfinite(lse)
    b, d = q.shape[0], q.shape[-1]
    mean = jax.lax.cond(
        jnp.all(seen),
        lambda: jnp.zeros((b, kv_heads, d), jnp.float32),
        lambda: jnp.broadcast_to(_value_mean(segments), (b, kv_heads, d)),
    )
    out = jnp.where(seen[..., None], out, mean[:, :, None, None, :])
    return _from_blocks(out, q.shape[1]).astype(q.dtype), lse


# --- blockwise: backward -----------------------------------------------------------


def _segment_backward(qb, dob, delta, lse, qpos, k, v, kpos, window, scale, block_k, grads):
    """Adds one query block's gradients into this segment's (dk, dv) and returns (dq, dk, dv).

    qb, dob [B, K, G, tq, D]; delta = sum(dout * out) and lse [B, K, G, tq].
    """
    p = _segment_parts(k, v, kpos)
    s_len = k.shape[p["k_axis"]]
    q_dtype = qb.dtype

    def block(carry, start, size):
        dq, dk, dv = carry
        kb = _kslice(k, start, size, p["k_axis"])
        vb = _kslice(v, start, size, p["v_axis"])
        pos = _kslice(kpos, start, size, 1)
        mask = _visible(qpos, pos, window)

        def compute(carry):
            dq, dk, dv = carry
            s = layers.attention_scores(qb, kb) * scale  # the forward pass's products
            probs = jnp.where(mask[:, None, None], jnp.exp(s - lse[..., None]), 0.0)
            dvb = jnp.einsum(
                p["dv"], probs.astype(vb.dtype), dob, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum(p["dp"], dob, vb, preferred_element_type=jnp.float32)
            ds = (probs * (dp - delta[..., None]) * scale).astype(q_dtype)
            dq = dq + jnp.einsum(p["dq"], ds, kb, preferred_element_type=jnp.float32)
            dkb = jnp.einsum(p["dk"], ds, qb, preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, _kslice(dk, start, size, p["k_axis"]) + dkb, start, p["k_axis"]
            )
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, _kslice(dv, start, size, p["v_axis"]) + dvb, start, p["v_axis"]
            )
            return dq, dk, dv

        return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry)

    return _over_key_blocks(block, (jnp.zeros(qb.shape, jnp.float32), *grads), s_len, block_k)


def _backward(q, segments, scale, qpos, window, block_q, block_k, out, lse, dout):
    kv_heads = segments[0][0].shape[-3]
    t = q.shape[1]
    qb, qposb = _to_blocks(q, qpos, kv_heads, block_q)
    dob, _ = _to_blocks(dout.astype(q.dtype), qpos, kv_heads, block_q)
    outb, _ = _to_blocks(out, qpos, kv_heads, block_q)
    delta = jnp.sum(dob.astype(jnp.float32) * outb.astype(jnp.float32), axis=-1)
    seen = jnp.isfinite(lse)
    total = sum(v.shape[-1] for _, v, _ in segments)
    # Queries that saw nothing took the mean of every value: their gradient goes
    # to the values alone, 1/total each.
    unseen = jnp.where(seen[..., None], 0.0, dob.astype(jnp.float32))
    unseen = jnp.sum(unseen, axis=(0, 3, 4))  # [nq, B, K, G, bq, D] -> [B, K, D]

    grads0 = [
        (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)) for k, v, _ in segments
    ]

    def step(grads, xs):
        qblock, doblock, dblock, lblock, pos = xs
        dq = 0.0
        new = []
        for (k, v, kpos), g in zip(segments, grads):
            dq_s, dk, dv = _segment_backward(
                qblock, doblock, dblock, lblock, pos, k, v, kpos, window, scale, block_k, g
            )
            dq = dq + dq_s
            new.append((dk, dv))
        return new, dq

    xs = (qb, dob, delta, lse, qposb)
    if qb.shape[0] == 1:
        grads, dq = step(grads0, tuple(x[0] for x in xs))
        dq = dq[None]
    else:
        grads, dq = jax.lax.scan(step, grads0, xs)
    dq = _from_blocks(dq, t).astype(q.dtype)
    dsegs = []
    for (k, v, kpos), (dk, dv) in zip(segments, grads):
        extra = unseen / total  # [B, K, D]
        if v.ndim == 3:
            extra = jnp.sum(extra, axis=0)
        dv = dv + extra[..., None]
        dsegs.append((dk.astype(k.dtype), dv.astype(v.dtype), None))
    return dq, dsegs


# --- blockwise: the custom VJP ------------------------------------------------------


def blockwise_attention(
    q: jax.Array,
    segments: Sequence[Segment],
    scale: float,
    query_positions: jax.Array,
    window: jax.Array | int = 0,
    block_q: int = CPU_BLOCK_SMALL,
    block_k: int = CPU_BLOCK_SMALL,
) -> jax.Array:
    """FlashAttention's forward and backward over q [B, T, H, D] and the segments.

    Equal (to float32 rounding) to `layers.dot_product_attention` with the
    masks `layers.attention_mask(query_positions, key_positions, window)`.
    """
    segments = tuple((k, v, jnp.asarray(pos, jnp.int32)) for k, v, pos in segments)
    window = jnp.asarray(window, jnp.int32)
    query_positions = jnp.asarray(query_positions, jnp.int32)
    return _blockwise(q, segments, query_positions, window, scale, block_q, block_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise(q, segments, qpos, window, scale, block_q, block_k):
    out, _ = _forward(q, segments, scale, qpos, window, block_q, block_k)
    return out


def _blockwise_fwd(q, segments, qpos, window, scale, block_q, block_k):
    out, lse = _forward(q, segments, scale, qpos, window, block_q, block_k)
    return out, (q, segments, qpos, window, out, lse)


def _blockwise_bwd(scale, block_q, block_k, residuals, dout):
    q, segments, qpos, window, out, lse = residuals
    dq, dsegs = _backward(q, segments, scale, qpos, window, block_q, block_k, out, lse, dout)
    dsegs = tuple((dk, dv, _int_zeros(pos)) for (dk, dv, _), (_, _, pos) in zip(dsegs, segments))
    return dq, dsegs, _int_zeros(qpos), _int_zeros(window)


def _int_zeros(x):
    import numpy as np

    return np.zeros(x.shape, jax.dtypes.float0)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# --- paged (the continuous-batching engine's KV cache) --------------------------------

# Keys read per block of the paged kernel: PAGED_BLOCK_TOKENS // page_size pages (at
# least one). XLA:CPU gathers each block out of the pool at about memcpy speed; small
# blocks stay in cache for the two products. 32 tokens was the fastest at 4 KV heads
# (at or under the dense cache's time), 16 at 12 (benchmarks/paged_attention.py).
PAGED_BLOCK_TOKENS = 32


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    scale: float,
    *,
    query_positions: jax.Array,
    window: jax.Array | int = 0,
    block_tokens: int = PAGED_BLOCK_TOKENS,
) -> jax.Array:
    """Grouped-query attention of q [B, T, H, D] over each row's pages of a shared pool.

    k_pages, v_pages [num_pages, page, K, D]: the pool. page_table [B, P]: row b's
    token at sequence index i sits in page page_table[b, i // page] at offset
    i % page, and its position is i (rows hold no padding). Everything a row's
    queries may see must already be written: the caller writes the new tokens'
    keys first. Entries past a row's pages point anywhere (page 0): causality hides
    them, as it hides what a page's previous owner left beyond the row's length.

    The split-K kernel of decode: an online softmax (float32) over blocks of
    `block_tokens` keys, each block's pages gathered from the pool (a copy small
    enough to stay in cache), as many blocks as the furthest query reaches
    (a `while_loop`, so a short batch never reads the table's unused pages) and
    blocks no query sees (sliding windows) skipped. Queries that see nothing
    (padding) get zeros.
    """
    b, t, h, d = q.shape
    page, kv_heads = k_pages.shape[1], k_pages.shape[2]
    per_block = max(1, block_tokens // page)
    pad = -page_table.shape[1] % per_block
    table = jnp.pad(page_table, ((0, 0), (0, pad)))
    span = per_block * page
    qb = jnp.transpose(q.reshape(b, t, kv_heads, h // kv_heads, d), (0, 2, 3, 1, 4))
    # Blocks up to the furthest any query reaches, within the table.
    blocks = jnp.minimum((jnp.max(query_positions) + span) // span, table.shape[1] // per_block)

    def block(i, carry):
        kpos = jnp.broadcast_to(i * span + jnp.arange(span), (b, span))
        mask = layers.attention_mask(query_positions, kpos, window)  # [B, T, span]

        def compute(carry):
            ids = jax.lax.dynamic_slice_in_dim(table, i * per_block, per_block, axis=1)
            kb = k_pages[ids].reshape(b, span, kv_heads, d)
            vb = v_pages[ids].reshape(b, span, kv_heads, d)
            s = jnp.einsum("bkgtd,bskd->bkgts", qb, kb, preferred_element_type=jnp.float32)
            s = jnp.where(mask[:, None, None], s * scale, -jnp.inf)

            def weigh(probs):
                probs = probs.astype(vb.dtype)
                return jnp.einsum(
                    "bkgts,bskd->bkgtd", probs, vb, preferred_element_type=jnp.float32
                )

            return _online_softmax(carry, s, weigh)

        return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry)

    init = (
        jnp.full((b, kv_heads, h // kv_heads, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, kv_heads, h // kv_heads, t), jnp.float32),
        jnp.zeros((b, kv_heads, h // kv_heads, t, d), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, blocks, block, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)


# --- cuDNN (GPU) ---------------------------------------------------------------------


def cudnn_arguments(q, segments, query_positions, window):
    """(query, key, value, mask) for `jax.nn.dot_product_attention`.

    Its layouts are [B, T, N, D] for the query and [B, S, K, D] for keys and
    values: the segments are concatenated along S (a shared prefix broadcast
    to the batch) and the visibility of every segment becomes one boolean
    mask [B, 1, T, S], which cuDNN applies as a bias. Left padding and
    positions that do not start at 0 have no (is_causal, seq_lengths) form,
    so the mask carries causality, padding and the window together.
    """
    b = q.shape[0]
    keys, values, masks = [], [], []
    for k, v, pos in segments:
        if k.ndim == 3:
            k, v = jnp.broadcast_to(k, (b, *k.shape)), jnp.broadcast_to(v, (b, *v.shape))
        keys.append(jnp.swapaxes(k, 1, 2))  # [B, S, K, D]
        values.append(jnp.transpose(v, (0, 3, 1, 2)))  # [B, S, K, D]
        masks.append(layers.attention_mask(query_positions, pos, window))
    key = jnp.concatenate(keys, axis=1)
    value = jnp.concatenate(values, axis=1).astype(key.dtype)
    mask = jnp.concatenate(masks, axis=-1)[:, None]
    return q.astype(key.dtype), key, value, mask


def cudnn_attention(q, segments, scale, query_positions, window, implementation="cudnn"):
    """`jax.nn.dot_product_attention` on `cudnn_arguments` (implementation="xla" on CPU
    tests the argument building against the dense attention)."""
    query, key, value, mask = cudnn_arguments(q, segments, query_positions, window)
    out = jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=scale, implementation=implementation
    )
    return out.astype(q.dtype)


# --- splash attention (TPU) --------------------------------------------------------------


def splash_attention(
    q,
    segments,
    scale,
    query_positions,
    window,
    *,
    sliding_window: int = 0,
    block: int = 512,
    interpret: bool = False,
):
    """Self-attention over one segment with the Pallas TPU splash-attention kernel.

    The kernel's masks are static and by index: causal (CausalMask) for
    global layers, LocalMask(window - 1, 0) for local ones, and padding as
    segment ids (0 for a padded key, 1 for a real one). That is the positions'
    rule when each row's real tokens are contiguous and counted from its first
    (`default_positions`), which is what rl_reason's training batches and
    cache-less prefills are; a query of padding sees padding keys instead of
    every key (its output is never used). `window` may be traced (the layer
    scan's); `sliding_window` is the static size local layers take: both
    kernels are built and `lax.cond` runs one. Lengths must be multiples of
    128 (the kernel's lanes); blocks are `block` cut to the length.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if len(segments) != 1:
        raise ValueError("splash attention takes self-attention over one segment (no cache).")
    ((k, v, key_positions),) = segments
    if k.ndim != 4:
        raise ValueError("splash attention needs per-row keys [B, K, S, D].")
    b, t, h, d = q.shape
    s_len = k.shape[2]
    if t != s_len or t % 128:
        raise ValueError(f"splash attention needs T == S, a multiple of 128; got {t}, {s_len}.")
    size = min(block, t)
    sizes = sk.BlockSizes(
        block_q=size,
        block_kv_compute=size,
        block_kv=size,
        block_q_dkv=size,
        block_kv_dkv=size,
        block_kv_dkv_compute=size,
        block_q_dq=size,
        block_kv_dq=size,
    )

    def kernel(mask):
        multi = sm.MultiHeadMask(tuple(mask for _ in range(h)))
        return sk.make_splash_mha(
            multi, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
        )

    causal = kernel(sm.CausalMask((t, s_len)))
    local = (
        kernel(sm.LocalMask((t, s_len), (sliding_window - 1, 0), offset=0))
        if sliding_window > 0
        else None
    )
    q_heads = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [B, H, T, D]
    v_rows = jnp.swapaxes(v, 2, 3).astype(k.dtype)  # [B, K, S, D]
    real = (key_positions >= 0).astype(jnp.int32)
    ids = sk.SegmentIds(q=real, kv=real)

    def run(fn):
        return jax.vmap(fn)(q_heads.astype(k.dtype), k, v_rows, segment_ids=ids)

    if local is None:
        out = run(causal)
    else:
        out = jax.lax.cond(jnp.asarray(window) > 0, lambda: run(local), lambda: run(causal))
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)  # [B, T, H, D]

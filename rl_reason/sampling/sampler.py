"""The pure, jitted sampler: one prefill, then `lax.while_loop`s over a static KV cache.

`sample(model, params, prompt_tokens, prompt_mask, rng, config) -> Rollout`
is a pure function of arrays. Prompts are left-padded so that every row
writes the same cache slot at every step; positions count real tokens only,
so a padded row computes exactly what it would alone. K samples per prompt
share one prefill and one copy of its keys and values: each row's own cache
holds only what it generates, and its attention reads the prompt's cache in
place (`Transformer(..., groups=)`), one product for the K rows of a prompt
rather than K copies streamed row by row.
As rows finish, the live ones move to smaller batches (`min_rows`), each
decoded by its own loop, so that a few long samples do not keep every
finished row computing.

Every row draws its randomness from `fold_in(rng, row_id)` and the step, so a
row's sample does not depend on which batch, bucket or device it ran in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rl_reason.models.transformer import (
    KEY_CACHE_AXES,
    VALUE_CACHE_AXES,
    KVCache,
    Transformer,
    default_positions,
    unstack_layers,
)

# Finish reasons.
LENGTH, EOS, STOP = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample; hashable, so a jitted sampler compiles once per setting."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut
    num_samples: int = 1  # K completions per prompt
    eos_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end a sample
    pad_id: int = 0
    # Row 0 of each prompt's num_samples decodes greedily, the others sample:
    # evaluation gets maj@1 and the K samples from one prefill.
    greedy_first: bool = False
    # Once few rows are still live, they move to a smaller batch (a quarter
    # the size rounded up to a multiple of min_rows, when that at least halves
    # it; keep min_rows a multiple of the mesh's batch shards), so that finished
    # rows stop costing compute while a few long samples finish. 0: never.
    min_rows: int = 8
    # Step conditioning (dense Return-Conditioned RL): right after any token of
    # step_starts (the tokens that end a line), the next token is step_token,
    # given rather than chosen, so every step of a solution starts with it as
    # in the model's training. -1: off.
    step_token: int = -1
    step_starts: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_samples < 1 or self.min_rows < 0:
            raise ValueError(
                "max_new_tokens and num_samples must be positive, min_rows not negative."
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"Need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature},"
                f" {self.top_p}, {self.top_k}."
            )
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("Stop sequences must not be empty.")
        if (self.step_token >= 0) != bool(self.step_starts) or self.step_token in self.step_starts:
            raise ValueError(
                "step_token and step_starts go together (step_token not among step_starts);"
                f" got {self.step_token} and {self.step_starts}."
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@flax.struct.dataclass
class Rollout:
    """K completions per prompt, rows ordered prompt-major (row = prompt * K + k).

    logprobs are under the untempered policy (what the PPO ratio and the KL
    need); sampling_logprobs under the distribution actually sampled from
    (after temperature, top-k, top-p; 0 for greedy). Both are 0 where
    completion_mask is False. The mask covers the generated tokens up to and
    including the EOS or stop sequence that ended the sample. Tokens the
    config's step conditioning gave (not chosen) score 0 in both.
    """

    prompt_tokens: jax.Array  # [N, P], left-padded
    prompt_mask: jax.Array  # [N, P]
    completion_tokens: jax.Array  # [N, G]
    completion_mask: jax.Array  # [N, G]
    logprobs: jax.Array  # [N, G] float32
    sampling_logprobs: jax.Array  # [N, G] float32
    lengths: jax.Array  # [N]
    finish_reason: jax.Array  # [N]: LENGTH, EOS or STOP
    decode_steps: jax.Array  # [N] decode steps the row's batch ran (< G after an early exit)

    def sequences(self) -> dict[str, jax.Array]:
        """Prompt + completion as one training batch {tokens, input_mask, loss_mask}."""
        concat = lambda a, b: jnp.concatenate([a, b], axis=1)
        return {
            "tokens": concat(self.prompt_tokens, self.completion_tokens),
            "input_mask": concat(self.prompt_mask, self.completion_mask),
            "loss_mask": concat(jnp.zeros_like(self.prompt_mask), self.completion_mask),
        }

    def sequence_logprobs(self) -> jax.Array:
        """The sampler's log-probs aligned with `sequences()["tokens"]` [N, P + G]: entry t
        scores token t, as the learner's `token_logprobs` do; 0 over the prompt. What
        `rollout_correction` compares with the learner's old log-probs."""
        prompt = jnp.zeros(self.prompt_tokens.shape, jnp.float32)
        return jnp.concatenate([prompt, jnp.asarray(self.logprobs, jnp.float32)], axis=1)


def left_pad(ids, width: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists (each at most width long) as left-padded [N, width] tokens and
    their mask: the layout `sample` takes and `Rollout.prompt_tokens` holds."""
    tokens = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for row, x in enumerate(ids):
        tokens[row, width - len(x) :] = x
        mask[row, width - len(x) :] = True
    return tokens, mask


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys whose unsigned order is the float32 order of x (-inf included)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(keys: jax.Array, holds) -> jax.Array:
    """Per row, the largest key t (of 2**32) with holds(keys >= t) true, as [N, 1].

    `holds(selected [N, V]) -> [N]` must hold for t = 0 (everything selected)
    and be monotone (true for every t below one where it holds). 32 bisection
    steps of one pass each find it exactly: a sort of the whole vocabulary
    costs far more on CPU, and the kept set is the one a sort would give, ties
    at the boundary included.
    """
    lo = jnp.zeros(keys.shape[:1], jnp.uint32)  # holds
    hi = jnp.full(keys.shape[:1], 0xFFFFFFFF, jnp.uint32)  # candidates are in [lo, hi]

    def bisect(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # in (lo, hi] while lo < hi
        ok = holds(keys >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, bisect, (lo, hi))
    return lo[:, None]


def _filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Tempered logits with everything outside top-k / the top-p nucleus at -inf.

    top-k keeps the logits at least as large as the k-th largest; top-p then
    keeps the smallest set of most likely tokens whose probability reaches
    top_p (ties with its last member included), as a sort would.
    """
    logits = logits / config.temperature
    if config.top_k:
        keys = _order_keys(logits)
        kth = _largest_threshold(keys, lambda kept: jnp.sum(kept, axis=-1) >= config.top_k)
        logits = jnp.where(keys >= kth, logits, -jnp.inf)
    if config.top_p < 1.0:
        probs = jax.nn.softmax(logits, axis=-1)
        keys = _order_keys(probs)
        # Never empty: nothing selected has mass 0 < top_p, so the top token stays.
        cut = _largest_threshold(
            keys, lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), axis=-1) >= config.top_p
        )
        logits = jnp.where(keys >= cut, logits, -jnp.inf)
    return logits


_CDF_BLOCK = 512


def _categorical(keys: jax.Array, weights: jax.Array) -> jax.Array:
    """One draw per row with probability proportional to weights [N, V] (>= 0).

    Inverts the CDF with one uniform per row instead of the V Gumbel variates
    of `jax.random.categorical`, whose generation dominated a sampled decode
    step. The inversion goes in two levels (blocks of the vocabulary, then
    within the chosen block) because one cumulative sum over a 262k
    vocabulary costs as much as the step's matmuls on CPU.
    """
    n, vocab = weights.shape
    blocks = -(-vocab // _CDF_BLOCK)
    weights = jnp.pad(weights, ((0, 0), (0, blocks * _CDF_BLOCK - vocab)))
    weights = weights.reshape(n, blocks, _CDF_BLOCK)
    mass = jnp.sum(weights, axis=-1)
    block_cdf = jnp.cumsum(mass, axis=-1)
    u = jax.vmap(jax.random.uniform)(keys) * block_cdf[:, -1]
    # Rounding may carry u past the last block with mass, or a block's own
    # cumulative sum past its total: each step falls back to its last possible entry.
    block = jnp.minimum(jnp.sum(block_cdf <= u[:, None], axis=-1), _last_positive(mass))
    chosen = jnp.take_along_axis(weights, block[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(block_cdf - mass, block[:, None], axis=1)[:, 0]
    rest = jnp.maximum(u - before, 0.0)
    inner = jnp.sum(jnp.cumsum(chosen, axis=-1) <= rest[:, None], axis=-1)
    return block * _CDF_BLOCK + jnp.minimum(inner, _last_positive(chosen))


def _last_positive(x: jax.Array) -> jax.Array:
    """Index of each row's last positive entry."""
    return x.shape[-1] - 1 - jnp.argmax((x > 0)[:, ::-1], axis=-1)


def choose_tokens(
    logits: jax.Array, keys: jax.Array, config: SamplingConfig, greedy_rows: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next tokens for logits [N, V] with one key per row.

    greedy_rows [N] marks rows that take the argmax even when config samples.
    Returns (tokens, policy log-probs, sampling log-probs; 0 for greedy rows), all [N].
    """
    # Each exp pass over a 262k vocabulary is a large share of a decode step,
    # so only the chosen tokens' log-probabilities are formed: two passes.
    logits = logits.astype(jnp.float32)
    pick = lambda x, idx: jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]
    tokens = jnp.argmax(logits, axis=-1)
    sampling = jnp.zeros(tokens.shape, jnp.float32)
    if not config.greedy:
        filtered = _filter_logits(logits, config)
        top = jnp.max(filtered, axis=-1, keepdims=True)
        weights = jnp.exp(filtered - top)
        drawn = _categorical(keys, weights)
        drawn_lp = pick(filtered - top, drawn) - jnp.log(jnp.sum(weights, axis=-1))
        if greedy_rows is None:
            tokens, sampling = drawn, drawn_lp
        else:
            tokens = jnp.where(greedy_rows, tokens, drawn)
            sampling = jnp.where(greedy_rows, 0.0, drawn_lp)
    policy_lp = pick(logits, tokens) - jax.nn.logsumexp(logits, axis=-1)
    return tokens.astype(jnp.int32), policy_lp, sampling


class NextTokens(NamedTuple):
    token: jax.Array  # [N], pad_id for rows no longer live
    policy_lp: jax.Array  # [N]
    sampling_lp: jax.Array  # [N]
    recent: jax.Array  # [N, M] the stop-sequence window with the chosen token
    hit_eos: jax.Array  # [N]
    hit_stop: jax.Array  # [N] a stop sequence ended (not by EOS)
    starts_step: jax.Array  # [N] the token starts a step (the next one is given)


def next_tokens(logits, keys, config: SamplingConfig, *, live, greedy, given, recent) -> NextTokens:
    """One decode step's choice for every row, and what it ends: the step every
    decode loop takes (`sample`'s and the continuous engine's).

    greedy: rows that take the argmax under config.greedy_first; given: rows whose
    token is config.step_token, not chosen (scored 0, invisible to stop sequences).
    """
    greedy_rows = greedy if config.greedy_first else None
    token, policy_lp, sampling_lp = choose_tokens(logits, keys, config, greedy_rows)
    conditioned = config.step_token >= 0
    if conditioned:
        token = jnp.where(given, config.step_token, token)
        policy_lp, sampling_lp = (jnp.where(given, 0.0, x) for x in (policy_lp, sampling_lp))
    token = jnp.where(live, token, config.pad_id)
    window = jnp.concatenate([recent[:, 1:], token[:, None]], axis=1)
    if conditioned:  # a given token is invisible to stop sequences ("\n<|good|>Question:")
        window = jnp.where(given[:, None], recent, window)
    hit_eos = jnp.isin(token, jnp.asarray(config.eos_ids, jnp.int32)) & live
    hit_stop = _ends_with_stop(window, config) & live & ~hit_eos & ~given
    starts_step = jnp.isin(token, jnp.asarray(config.step_starts, jnp.int32)) & ~given
    return NextTokens(token, policy_lp, sampling_lp, window, hit_eos, hit_stop, starts_step)


def _ends_with_stop(recent: jax.Array, config: SamplingConfig) -> jax.Array:
    """Whether each row's latest tokens (recent [N, M], newest last) end with a stop sequence."""
    hit = jnp.zeros(recent.shape[0], bool)
    for stop in config.stop_sequences:
        tail = recent[:, recent.shape[1] - len(stop) :]
        hit |= jnp.all(tail == jnp.asarray(stop, jnp.int32), axis=-1)
    return hit


@flax.struct.dataclass
class _LoopState:
    """The decode loop's state: n decoding rows, results for all N rows of the batch.

    The loop decodes n <= N rows (all of them at first, then only the live
    ones, see `_shrink`); `rows` maps each to its row of the batch, N for an
    empty slot.
    """

    step: jax.Array
    rows: jax.Array  # [n]
    live: jax.Array  # [n] still generating
    cache: KVCache  # n rows
    logits: jax.Array  # [n, V] for the token about to be chosen
    positions: jax.Array  # [n] position of that token
    keys: jax.Array  # [n] each row's random key
    greedy: jax.Array  # [n] each prompt's first row: greedy under config.greedy_first
    recent: jax.Array  # [n, M] last chosen tokens (not given ones), for stop sequences
    given: jax.Array  # [n] the next token is config.step_token, not chosen
    tokens: jax.Array  # [N, G]
    logprobs: jax.Array  # [N, G]
    sampling_logprobs: jax.Array  # [N, G]
    lengths: jax.Array  # [N] tokens chosen while live
    finish_reason: jax.Array  # [N]


@flax.struct.dataclass
class Prefix:
    """Prompt tokens that every row starts with (few-shot exemplars), prefilled once.

    sample() neither recomputes nor copies the prefix per row: every row's
    attention reads its one batch-1 cache (`Transformer(..., shared=)`), and
    only the rows' own suffixes are prefilled and cached.
    """

    tokens: jax.Array  # [L], real tokens only
    cache: KVCache  # batch 1, L slots at positions 0..L-1

    @property
    def length(self) -> int:
        return self.tokens.shape[0]


def prefill_prefix(model: Transformer, params: Any, tokens: jax.Array) -> Prefix:
    """The Prefix of tokens [L] (the model and params as for `sample`)."""
    if "layers" in params["params"]:
        params = unstack_layers(params)
    tokens = jnp.asarray(tokens, jnp.int32)[None]
    cache = KVCache.init(model.config, 1, tokens.shape[1])
    out = model.apply(params, tokens, default_positions(jnp.ones(tokens.shape, bool)), cache=cache)
    return Prefix(tokens=tokens[0], cache=out.cache)


prefill_prefix_jit = jax.jit(prefill_prefix, static_argnames="model")


def _constrain_cache(cache: KVCache) -> KVCache:
    """Rows over the batch axes, KV heads over tensor (a no-op without a mesh)."""
    constrain = lambda axes: lambda x: nn.with_logical_constraint(x, axes)
    return cache.replace(
        k=tuple(map(constrain(KEY_CACHE_AXES), cache.k)),
        v=tuple(map(constrain(VALUE_CACHE_AXES), cache.v)),
    )


def _map_rows(cache: KVCache, fn) -> KVCache:
    """fn applied to every per-row array of the cache (keys, values, slot positions)."""
    return _constrain_cache(
        cache.replace(
            k=tuple(map(fn, cache.k)), v=tuple(map(fn, cache.v)), positions=fn(cache.positions)
        )
    )


def _decode_batch_sizes(rows: int, min_rows: int) -> list[int]:
    """The decode loop's batch sizes: rows, then about a quarter at a time down to min_rows.

    Each size at least halves the one before: every phase compiles another copy
    of the decode step and gathers the cache, which a small cut does not repay.
    """
    sizes = [rows]
    while min_rows:
        quarter = -(-sizes[-1] // 4)
        smaller = -(-quarter // min_rows) * min_rows
        if smaller > sizes[-1] // 2:
            break
        sizes.append(smaller)
    return sizes


def _shrink(state: _LoopState, size: int, batch: int, groups: KVCache | None, k: int) -> _LoopState:
    """The state with its live rows (at most `size`) moved into a batch of `size` rows.

    With the prompts' `groups` cache (the first shrink), the rows no longer sit in
    groups of K: each takes a copy of its prompt's keys ahead of its own."""
    order = jnp.argsort(~state.live, stable=True)[:size]  # live rows first, in order
    live = state.live[order]
    take = lambda x: x[order]
    cache = _map_rows(state.cache, take)
    if groups is not None:
        prompts = jnp.minimum(state.rows[order], batch - 1) // k
        cache = _join(_map_rows(groups, lambda x: x[prompts]), cache)
    return state.replace(
        rows=jnp.where(live, state.rows[order], batch),
        live=live,
        cache=cache,
        logits=take(state.logits),
        positions=take(state.positions),
        keys=take(state.keys),
        greedy=take(state.greedy),
        recent=take(state.recent),
        given=take(state.given),
    )


def _join(first: KVCache, then: KVCache) -> KVCache:
    """One cache per row of `first`'s slots followed by `then`'s (the same rows)."""
    return _constrain_cache(
        KVCache(
            k=tuple(jnp.concatenate(pair, axis=2) for pair in zip(first.k, then.k)),
            v=tuple(jnp.concatenate(pair, axis=3) for pair in zip(first.v, then.v)),
            positions=jnp.concatenate([first.positions, then.positions], axis=1),
            index=first.index + then.index,
        )
    )


def sample(
    model: Transformer,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    config: SamplingConfig,
    row_offset: jax.Array | int = 0,
    prefix: Prefix | None = None,
) -> Rollout:
    """Samples config.num_samples completions for each left-padded prompt row.

    `model` must be the unrolled (scan_layers=False) model; `params` may be in
    either layout (scanned ones are unstacked once, here). `row_offset` is the
    global index of this batch's first row, for batch-independent randomness.
    With a `prefix`, every row's prompt is prefix + its row of prompt_tokens
    (whose left padding then sits between the two, masked like any padding).
    """
    if model.config.scan_layers:
        raise ValueError("sample() needs a Transformer with scan_layers=False.")
    if "layers" in params["params"]:
        params = unstack_layers(params)
    batch, prompt_len = prompt_tokens.shape
    k, new = config.num_samples, config.max_new_tokens
    rows = batch * k

    prefix_len, shared = (0, None) if prefix is None else (prefix.length, prefix.cache)
    # K > 1: the prompts' cache is the K rows' `groups`, each row's own only what it
    # generates. K = 1: one cache a row, the prompt's slots and then the new ones.
    prompt_cache = KVCache.init(model.config, batch, prompt_len + (0 if k > 1 else new))
    positions = prefix_len + default_positions(prompt_mask)
    prefill = model.apply(
        params, prompt_tokens, positions, prompt_mask, _constrain_cache(prompt_cache), shared
    )
    logits = model.apply(params, prefill.hidden[:, -1], method=Transformer.logits)
    if k > 1:
        groups, cache = prefill.cache, KVCache.init(model.config, rows, new)
    else:
        groups, cache = None, prefill.cache
    state = _initial_state(
        _constrain_cache(cache), logits, positions, prompt_mask, rng, row_offset, config
    )

    sizes = _decode_batch_sizes(rows, config.min_rows)
    for size, next_size in zip(sizes, [*sizes[1:], 0]):
        if size < rows:
            state = _shrink(state, size, rows, groups, k)
            groups = None  # now in each row's own cache

        def cond(s: _LoopState, next_size=next_size):
            return (s.step < config.max_new_tokens) & (jnp.sum(s.live) > next_size)

        def body(s: _LoopState, groups=groups) -> _LoopState:
            return _decode_step(model, params, shared, groups, config, s)

        state = jax.lax.while_loop(cond, body, state)
    return _rollout(state, prompt_tokens, prompt_mask, prefix, config)


def _initial_state(cache, logits, positions, prompt_mask, rng, row_offset, config) -> _LoopState:
    """The decode loop's state after the prefill (`cache`: each row's own, K rows a
    prompt): every prompt row's logits and position repeated K times."""
    batch = prompt_mask.shape[0]
    k, new = config.num_samples, config.max_new_tokens
    rows = batch * k
    repeat = lambda x: jnp.repeat(x, k, axis=0)
    row_ids = row_offset * k + jnp.arange(rows)
    window = max([len(s) for s in config.stop_sequences], default=1)
    return _LoopState(
        step=jnp.zeros((), jnp.int32),
        rows=jnp.arange(rows),
        live=repeat(jnp.any(prompt_mask, axis=1)),  # empty filler rows never start
        cache=cache,
        logits=repeat(logits),
        positions=repeat(positions[:, -1] + 1),
        keys=jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids),
        greedy=jnp.arange(rows) % k == 0,
        recent=jnp.full((rows, window), -1, jnp.int32),
        given=jnp.zeros((rows,), bool),  # a conditioned prompt carries the first step's token
        tokens=jnp.full((rows, new), config.pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, new), jnp.float32),
        sampling_logprobs=jnp.zeros((rows, new), jnp.float32),
        lengths=jnp.zeros((rows,), jnp.int32),
        finish_reason=jnp.full((rows,), LENGTH, jnp.int32),
    )


def _decode_step(
    model, params, shared, groups, config: SamplingConfig, s: _LoopState
) -> _LoopState:
    """One token for every live row: choose it, run it through the model, record it."""
    keys = jax.vmap(jax.random.fold_in, (0, None))(s.keys, s.step)
    token, policy_lp, sampling_lp, recent, hit_eos, hit_stop, starts_step = next_tokens(
        s.logits, keys, config, live=s.live, greedy=s.greedy, given=s.given, recent=s.recent
    )
    out = model.apply(
        params,
        token[:, None],
        s.positions[:, None],
        s.live[:, None],
        s.cache,
        shared,
        groups=groups,
    )
    # Results go to the rows' places in the batch; empty slots (row N) are dropped.
    write = lambda buf, value: buf.at[s.rows, s.step].set(value, mode="drop")
    reason = s.finish_reason.at[s.rows].get(mode="fill", fill_value=LENGTH)
    reason = jnp.where(hit_eos, EOS, jnp.where(hit_stop, STOP, reason))
    return s.replace(
        step=s.step + 1,
        live=s.live & ~hit_eos & ~hit_stop,
        cache=out.cache,
        logits=model.apply(params, out.hidden[:, -1], method=Transformer.logits),
        positions=s.positions + 1,
        recent=recent,
        given=starts_step & s.live & ~hit_eos & ~hit_stop,
        tokens=write(s.tokens, token),
        logprobs=write(s.logprobs, jnp.where(s.live, policy_lp, 0.0)),
        sampling_logprobs=write(s.sampling_logprobs, jnp.where(s.live, sampling_lp, 0.0)),
        lengths=s.lengths.at[s.rows].add(s.live.astype(jnp.int32), mode="drop"),
        finish_reason=s.finish_reason.at[s.rows].set(reason, mode="drop"),
    )


def _rollout(state: _LoopState, prompt_tokens, prompt_mask, prefix, config) -> Rollout:
    """The finished loop as a Rollout, each prompt row repeated for its K samples."""
    batch = prompt_tokens.shape[0]
    repeat = lambda x: jnp.repeat(x, config.num_samples, axis=0)
    completion_mask = jnp.arange(config.max_new_tokens)[None, :] < state.lengths[:, None]
    if prefix is not None:
        every_row = lambda x: jnp.broadcast_to(x, (batch, prefix.length))
        prompt_tokens = jnp.concatenate([every_row(prefix.tokens), prompt_tokens], axis=1)
        prompt_mask = jnp.concatenate([every_row(True), prompt_mask], axis=1)
    return Rollout(
        prompt_tokens=repeat(prompt_tokens),
        prompt_mask=repeat(prompt_mask),
        completion_tokens=state.tokens,
        completion_mask=completion_mask,
        logprobs=state.logprobs,
        sampling_logprobs=state.sampling_logprobs,
        lengths=state.lengths,
        finish_reason=state.finish_reason,
        decode_steps=jnp.full((batch * config.num_samples,), state.step),
    )


_STATIC_ARGS = ("model", "config")

sample_jit = jax.jit(sample, static_argnames=_STATIC_ARGS)

# XLA:CPU's plain dots (XNNPACK) instead of its YNNPACK fusions: faster decode
# for small batches of narrow models, slower for others (see BENCHMARKS.md).
CPU_XNNPACK_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def jit_sample(compiler_options: Mapping[str, Any] | None = None) -> Callable:
    """`sample` compiled, one program per (model, config, shapes).

    compiler_options are XLA options for that program only, not the process:
    the best matmul library on XLA:CPU depends on the model and batch, so a
    sampler can be tuned without touching training. None or empty: `sample_jit`.
    """
    if not compiler_options:
        return sample_jit
    return jax.jit(sample, static_argnames=_STATIC_ARGS, compiler_options=dict(compiler_options))

"""Continuous batching over a paged KV cache: the rollout engine.

A fixed number of decode slots run one jitted loop of decode steps; when a
row finishes (EOS, stop sequence, length) its slot takes the next waiting
sample, whatever its prompt or length, so that no slot idles while a few
long samples finish (today's static `sampler.sample` runs each batch to its
longest row). The keys and values live in a pool of fixed-size pages
(`transformer.PagedKV`, a memory budget in bytes); each slot holds a page
table, gets pages as it grows and returns them when it ends, and the full
pages of a prompt are shared by its K samples and by every prompt that
starts with the same tokens (`pages.PagePool`'s prefix cache).

The program family: `prefill` (chunks of prompt tokens for a few slots,
written into their pages) and `decode` (a `while_loop` of steps over every
slot: feed each slot's token, choose the next from the logits), both pure
and jitted; the host in between admits samples, reserves pages for the next
`decode_horizon` steps and releases finished slots. A sample's last prompt
token is fed by its first decode step, so K samples of a prompt share every
prefilled page and need no copy of the prompt's logits.

What the static sampler guarantees holds here: a row draws from
fold_in(fold_in(rng, row), tokens so far), so its tokens do not depend on its
slot, the other rows or the order of arrival (and a row pushed out of the
pool is recomputed exactly); the log-probs are the untempered policy's; stop
sequences, EOS, top-k/top-p, greedy-first rows and step conditioning behave
as in `sampler.sample`, and the result is the same `Rollout`.

On a mesh the slots are split over its batch shards (data x fsdp), as the
static sampler's rows are: each shard is an engine of its own (its slots, its
page pool of `kv_cache_bytes`, its prompts: prompt p goes to shard p mod D, its
K samples with it), and one `shard_map`ped program runs every shard's loop, each
to its own end. The host keeps one book per shard and decides the same on every
process, so it runs unchanged on several hosts. Weights are used as the learner
holds them; each program gathers what a shard needs (a tensor axis computes the
same rows on each of its devices).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rl_reason.models.config import ModelConfig
from rl_reason.models.transformer import PagedKV, Transformer, unstack_layers
from rl_reason.parallel import sharding as shd
from rl_reason.sampling.pages import PagePool, PoolExhausted, prefix_keys
from rl_reason.sampling.sampler import (
    EOS,
    LENGTH,
    STOP,
    Rollout,
    SamplingConfig,
    left_pad,
    next_tokens,
)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's shape: slots, pages, and how often the host steps in."""

    slots: int = 32  # rows decoded at once
    page_size: int = 16  # tokens per KV page
    # The pool's size in bytes (keys and values of every layer); 0: enough for
    # every slot at the longest prompt plus max_new_tokens (no row ever waits for pages).
    # (On a mesh, the pool of each batch shard.)
    kv_cache_bytes: int = 0
    prefill_chunk: int = 256  # prompt tokens a slot prefills per call, at most
    decode_horizon: int = 64  # decode steps between two visits of the host, at most
    # Return to the host to admit waiting samples once this many slots have
    # finished (0: a quarter of the slots).
    admit_after: int = 0
    # Once nothing waits, the last rows move to fewer slots (halving, down to this;
    # 0 never): only their page tables move, not their caches. Each count is a
    # decode program of its own, compiled once per engine.
    min_slots: int = 4

    def __post_init__(self):
        if min(self.slots, self.page_size, self.prefill_chunk, self.decode_horizon) < 1:
            raise ValueError(f"EngineConfig needs positive sizes; got {self}.")

    def page_bytes(self, model: ModelConfig) -> int:
        itemsize = jnp.dtype(model.compute_dtype).itemsize
        return (
            2 * model.num_layers * self.page_size * model.num_kv_heads * model.head_dim * itemsize
        )


@flax.struct.dataclass
class Slots:
    """Every slot's decoding state; row = N marks an empty slot."""

    row: jax.Array  # [S] the row within the call (prompt * K + k; row_base + row: global)
    result_row: jax.Array  # [S] where its outputs go in this shard's Results
    live: jax.Array  # [S]
    token: jax.Array  # [S] the token the next step feeds
    position: jax.Array  # [S] its position
    generated: jax.Array  # [S] tokens chosen so far
    greedy: jax.Array  # [S] decodes greedily (greedy_first's first row of a prompt)
    recent: jax.Array  # [S, M] last chosen tokens, for stop sequences
    given: jax.Array  # [S] the next chosen token is config.step_token
    page_table: jax.Array  # [S, P]


@flax.struct.dataclass
class Results:
    """Rows' outputs, indexed by their row within the call (N rows)."""

    tokens: jax.Array  # [N, G]
    logprobs: jax.Array  # [N, G]
    sampling_logprobs: jax.Array  # [N, G]
    lengths: jax.Array  # [N]
    finish_reason: jax.Array  # [N]


def _unrolled(params):
    """Params in the decoder's layout; inside a jitted function a scanned layout's
    per-layer slices cost no copy of the weights."""
    return unstack_layers(params) if "layers" in params["params"] else params


def _prefill(model: Transformer, params, pool, tokens, positions, mask, page_table):
    params = _unrolled(params)
    out = model.apply(params, tokens, positions, mask, paged=PagedKV(*pool, page_table))
    return out.cache.k, out.cache.v


@functools.partial(jax.jit, static_argnames="model", donate_argnames="pool")
def prefill(model: Transformer, params, pool, tokens, positions, mask, page_table):
    """Writes prompt tokens [B, T] (real where mask) at their positions into the rows'
    pages; returns the pool (k, v). The logits are not needed: each sample's first
    decode step feeds the prompt's last token."""
    return _prefill(model, params, pool, tokens, positions, mask, page_table)


def _decode(
    model,
    config: SamplingConfig,
    params,
    rng,
    row_base,
    slots,
    results,
    pool,
    max_steps,
    finish_target,
):
    """Decode steps over every slot until max_steps, no live slot, or finish_target slots
    finished in this call (0: never for that). Returns (slots, results, pool, steps)."""
    params = _unrolled(params)
    n_rows = results.lengths.shape[0]
    was_live = slots.live

    def cond(carry):
        step, s, _, _ = carry
        finished = jnp.sum(was_live & ~s.live)
        early = (finish_target > 0) & (finished >= finish_target)
        return (step < max_steps) & jnp.any(s.live) & ~early

    def body(carry):
        step, s, r, pool = carry
        out = model.apply(
            params,
            s.token[:, None],
            s.position[:, None],
            s.live[:, None],
            paged=PagedKV(*pool, s.page_table),
        )
        logits = model.apply(params, out.hidden[:, -1], method=Transformer.logits)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, row_base + s.row)
        keys = jax.vmap(jax.random.fold_in)(row_keys, s.generated)
        token, policy_lp, sampling_lp, recent, hit_eos, hit_stop, starts_step = next_tokens(
            logits, keys, config, live=s.live, greedy=s.greedy, given=s.given, recent=s.recent
        )
        rows = jnp.where(s.live, s.result_row, n_rows)  # out of range: dropped
        write = lambda buf, value: buf.at[rows, s.generated].set(value, mode="drop")
        generated = s.generated + s.live
        ended = hit_eos | hit_stop
        reason = jnp.where(hit_eos, EOS, jnp.where(hit_stop, STOP, LENGTH))
        live = s.live & ~ended & (generated < config.max_new_tokens)
        r = r.replace(
            tokens=write(r.tokens, token),
            logprobs=write(r.logprobs, policy_lp),
            sampling_logprobs=write(r.sampling_logprobs, sampling_lp),
            lengths=r.lengths.at[rows].set(generated, mode="drop"),
            finish_reason=r.finish_reason.at[rows].set(reason, mode="drop"),
        )
        s = s.replace(
            live=live,
            token=jnp.where(s.live, token, s.token),
            position=s.position + s.live,
            generated=generated,
            recent=recent,
            given=starts_step & live,
        )
        return step + 1, s, r, (out.cache.k, out.cache.v)

    steps, slots, results, pool = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), slots, results, pool)
    )
    return slots, results, pool, steps


decode = jax.jit(_decode, static_argnames=("model", "config"), donate_argnames=("results", "pool"))


# The sharded programs below run the model's code per shard unchanged; shard_map's
# check of varying axes (check_vma) would need every branch of it annotated, and every
# output here is split over the shards anyway (out_specs=rows).


def _shards_spec(mesh: Mesh) -> P:
    """Dimension 0 split over the mesh's batch axes."""
    return P(tuple(a for a in shd.BATCH_AXES if a in mesh.shape))


@functools.partial(jax.jit, static_argnames=("model", "mesh"), donate_argnames="pool")
def prefill_sharded(model: Transformer, mesh: Mesh, params, pool, tokens, positions, mask, table):
    """`prefill` on every batch shard at once: rows and pages split over the shards, a
    shard's page tables indexing its own pages."""
    rows = _shards_spec(mesh)

    def local(*args):
        with nn.logical_axis_rules(()):  # a shard's arrays: no mesh-wide constraints
            return _prefill(model, *args)

    specs = (P(), rows, rows, rows, rows, rows)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=rows, check_vma=False)(
        params, pool, tokens, positions, mask, table
    )


@functools.partial(
    jax.jit, static_argnames=("model", "config", "mesh"), donate_argnames=("results", "pool")
)
def decode_sharded(
    model, config, mesh, params, rng, row_base, slots, results, pool, max_steps, finish_target
):
    """`decode` on every batch shard at once, each shard's loop to its own end (no
    collective inside: a shard that is done waits for the others only at the end).
    max_steps and finish_target are per shard [D]; steps come back per shard."""
    rows = _shards_spec(mesh)

    def local(params, rng, row_base, slots, results, pool, max_steps, finish_target):
        with nn.logical_axis_rules(()):  # a shard's arrays: no mesh-wide constraints
            out = _decode(
                model, config, params, rng, row_base, slots, results, pool, max_steps[0],
                finish_target[0],
            )  # fmt: skip
        return *out[:3], out[3][None]

    specs = (P(), P(), P(), rows, rows, rows, rows, rows)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=rows, check_vma=False)(
        params, rng, row_base, slots, results, pool, max_steps, finish_target
    )


def _slot_counts(slots: int, smallest: int) -> list[int]:
    """The decode programs' slot counts: slots, then halving down to `smallest`."""
    counts = [slots]
    while smallest and counts[-1] // 2 >= smallest:
        counts.append(counts[-1] // 2)
    return counts


def _bucket(n: int, cap: int) -> int:
    """The power of two at least n (at most cap, which bounds the compiled shapes)."""
    return min(cap, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class _Row:
    """What the host knows of an admitted row."""

    row: int  # within the call
    pages: list[int]
    prompt_length: int


@dataclasses.dataclass
class _Call:
    """The host's state of one shard during one `generate` call: its slots, its
    page book, and the rows of its prompts (prompt p is shard p mod shards')."""

    prompt_ids: Sequence[Sequence[int]]
    k: int  # samples per prompt
    new: int  # max_new_tokens
    slots: dict[str, np.ndarray]  # the fields of `Slots`, on the host
    waiting: collections.deque  # rows not admitted yet, the next first
    pool: PagePool  # this shard's pages
    shards: int = 1
    held: dict[int, _Row] = dataclasses.field(default_factory=dict)  # slot -> its row
    admitted: list[int] = dataclasses.field(default_factory=list)  # slots, oldest first

    @property
    def n_rows(self) -> int:
        return len(self.prompt_ids) * self.k

    def result_row(self, row: int) -> int:
        """Where `row` (within the call) goes in this shard's Results."""
        prompt, sample = divmod(row, self.k)
        return prompt // self.shards * self.k + sample

    def free(self, slot: int) -> None:
        """The slot holds no row (its pages are the caller's to release)."""
        self.slots["live"][slot] = False
        self.slots["row"][slot] = self.slots["result_row"][slot] = self.n_rows
        self.slots["page_table"][slot] = 0

    def compact(self) -> None:
        """Moves the held slots' state to slots 0 .. len(held) - 1 (their pages stay
        where they are: only page tables move)."""
        moves = {old: new for new, old in enumerate(sorted(self.held))}
        if all(old == new for old, new in moves.items()):
            return
        for name, x in self.slots.items():
            moved = x[list(moves)].copy()
            x[len(moves) :] = self.n_rows if name in ("row", "result_row") else 0
            x[: len(moves)] = moved
        self.held = {moves[s]: info for s, info in self.held.items()}
        self.admitted = [moves[s] for s in self.admitted]


def _empty_slots(count: int, n_rows: int, table_width: int, window: int) -> dict[str, np.ndarray]:
    return {
        "row": np.full(count, n_rows, np.int32),
        "result_row": np.full(count, n_rows, np.int32),
        "live": np.zeros(count, bool),
        "token": np.zeros(count, np.int32),
        "position": np.zeros(count, np.int32),
        "generated": np.zeros(count, np.int32),
        "greedy": np.zeros(count, bool),
        "recent": np.full((count, window), -1, np.int32),
        "given": np.zeros(count, bool),
        "page_table": np.zeros((count, table_width), np.int32),
    }


def _empty_results(rows: int, new: int, pad_id: int) -> Results:
    return Results(
        tokens=np.full((rows, new), pad_id, np.int32),
        logprobs=np.zeros((rows, new), np.float32),
        sampling_logprobs=np.zeros((rows, new), np.float32),
        lengths=np.zeros((rows,), np.int32),
        finish_reason=np.full((rows,), LENGTH, np.int32),
    )


# The slot fields a decode call changes: all the host reads back.
_DECODED = ("live", "token", "position", "generated", "recent", "given")
_STATS = (
    "decode_calls", "decode_steps", "prefill_calls", "prefilled_tokens", "shared_pages", "preempted"
)  # fmt: skip


class Engine:
    """Continuous-batching generation for one model over a reusable page pool
    (on a mesh: a pool and engine.slots / D slots on each of its D batch shards)."""

    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig = EngineConfig(),
        mesh: Mesh | None = None,
    ):
        self.model = Transformer(model_config.replace(scan_layers=False))
        self.config = engine_config
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.shards = 1 if self.mesh is None else shd.batch_shards(self.mesh)
        if engine_config.slots % self.shards:
            raise ValueError(
                f"engine slots={engine_config.slots} do not split over the mesh's"
                f" {self.shards} batch shards (data x fsdp); choose a multiple of {self.shards}."
            )
        self.slots = engine_config.slots // self.shards  # each shard's
        self._pool = None  # device (k, v), kept between calls
        self.pools: list[PagePool] = []  # each shard's book of its pages
        self.stats: dict[str, int] = {}

    @property
    def pool(self) -> PagePool:
        """The page book (of the only shard; `pools` holds one a shard)."""
        if len(self.pools) != 1:
            raise ValueError(f"{len(self.pools)} page books, one a shard: use Engine.pools.")
        return self.pools[0]

    def generate(
        self,
        params: Any,
        prompt_ids: Sequence[Sequence[int]],
        rng: jax.Array,
        config: SamplingConfig,
        row_offset: int = 0,
        row_order: Sequence[int] | None = None,
        prompt_width: int = 0,
    ) -> Rollout:
        """config.num_samples completions of every prompt (token ids, BOS included),
        as a Rollout on the host (rows prompt-major, prompts left-padded to the longest).
        row_offset: the global index of prompt_ids[0], for split-independent randomness.
        row_order: the order rows wait in (default prompt-major, siblings together,
        which shares their prompt pages best); it changes no token. prompt_width:
        the Rollout's prompt columns (at least the longest prompt; 0: the longest)."""
        k, new = config.num_samples, config.max_new_tokens
        if any(len(x) == 0 for x in prompt_ids):
            raise ValueError("Every prompt needs at least one token.")
        longest = max(len(x) for x in prompt_ids)
        table_width = self._pages_for(longest + new)
        num_pages = self._start_pool(table_width, longest, new)
        n_rows = len(prompt_ids) * k
        order = list(range(n_rows) if row_order is None else row_order)
        if sorted(order) != list(range(n_rows)):
            raise ValueError(f"row_order must order the rows 0..{n_rows - 1}.")
        window = max([len(s) for s in config.stop_sequences], default=1)
        self.pools = [PagePool(num_pages) for _ in range(self.shards)]
        calls = [
            _Call(
                prompt_ids,
                k,
                new,
                slots=_empty_slots(self.slots, n_rows, table_width, window),
                waiting=collections.deque(r for r in order if r // k % self.shards == shard),
                pool=pool,
                shards=self.shards,
            )
            for shard, pool in enumerate(self.pools)
        ]
        rows_per_shard = -(-len(prompt_ids) // self.shards) * k
        results = self._put(_empty_results(self.shards * rows_per_shard, new, config.pad_id))
        self.stats = dict.fromkeys(_STATS, 0)
        row_base = jnp.int32(row_offset * k)
        while any(call.waiting or call.held for call in calls):
            self._admit(params, calls)
            if any(call.waiting and not call.held for call in calls):
                raise PoolExhausted("No sample fits the page pool; raise kv_cache_bytes.")
            horizons = [self._reserve(call) for call in calls]
            shapes = [self._decode_shape(call) for call in calls]
            size = max(size for size, _ in shapes)
            stacked = {
                n: np.concatenate([c.slots[n][:size] for c in calls]) for n in calls[0].slots
            }
            device_slots = self._put(Slots(**stacked))
            device_slots, results, self._pool, steps = self._decode(
                config, params, rng, row_base, device_slots, results, horizons,
                [target for _, target in shapes],
            )  # fmt: skip
            self.stats["decode_calls"] += 1
            self.stats["decode_steps"] += int(np.sum(shd.to_host(steps)))
            host = shd.to_host({name: getattr(device_slots, name) for name in _DECODED})
            for shard, call in enumerate(calls):
                for name, x in host.items():
                    call.slots[name][:size] = x[shard * size : (shard + 1) * size]
                for slot in [s for s in call.held if not call.slots["live"][s]]:
                    call.pool.release(call.held.pop(slot).pages)
                    call.admitted.remove(slot)
                    call.free(slot)
        if not all(pool.all_free() for pool in self.pools):
            raise RuntimeError("pages still held after every row finished")
        self.stats["peak_pages"] = sum(pool.peak_in_use for pool in self.pools)
        self.stats["pool_pages"] = sum(pool.num_pages - 1 for pool in self.pools)
        for pool in self.pools:
            pool.forget_prefixes()
        host = _prompt_major(shd.to_host(results), len(prompt_ids), k, self.shards)
        return _rollout(prompt_ids, k, host, max(prompt_width, longest), config.pad_id)

    def _put(self, tree):
        """Host arrays onto the device(s): on a mesh, dimension 0 split over the batch
        shards (every process passes the same whole arrays and keeps its shards)."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        sharding = NamedSharding(self.mesh, _shards_spec(self.mesh))
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(x.shape, sharding, lambda i: x[i]), tree
        )

    def _decode(self, config, params, rng, row_base, slots, results, horizons, targets):
        if self.mesh is None:
            return decode(
                self.model, config, params, rng, row_base, slots, results, self._pool,
                jnp.int32(horizons[0]), jnp.int32(targets[0]),
            )  # fmt: skip
        per_shard = self._put((np.asarray(horizons, np.int32), np.asarray(targets, np.int32)))
        return decode_sharded(
            self.model, config, self.mesh, params, rng, row_base, slots, results, self._pool,
            *per_shard,
        )  # fmt: skip

    def _pages_for(self, length: int) -> int:
        return -(-length // self.config.page_size)

    def _start_pool(self, table_width: int, longest: int, new: int) -> int:
        """Each shard's number of pages (kv_cache_bytes' worth, or every slot at full
        length); the device pool (every shard's pages) reused when its size has not changed."""
        ec = self.config
        page_bytes = ec.page_bytes(self.model.config)
        num_pages = (
            ec.kv_cache_bytes // page_bytes if ec.kv_cache_bytes else 1 + self.slots * table_width
        )
        if num_pages - 1 < table_width:
            raise PoolExhausted(
                f"kv_cache_bytes={ec.kv_cache_bytes} holds {num_pages} pages of {page_bytes}"
                f" bytes; one row of {longest} prompt and {new} new tokens needs {table_width}"
                " besides the reserved page."
            )
        total = self.shards * num_pages
        if self._pool is None or self._pool[0][0].shape[0] != total:
            c = self.model.config
            shape = (total, ec.page_size, c.num_kv_heads, c.head_dim)
            zeros = lambda: tuple(np.zeros(shape, c.compute_dtype) for _ in range(c.num_layers))
            self._pool = self._put((zeros(), zeros()))
        return num_pages

    def _decode_shape(self, call: _Call) -> tuple[int, int]:
        """(slots the next decode runs, finished rows that end it early; 0: none).

        While rows wait, every slot decodes and the host comes back once admit_after
        slots are free; then the last rows move to the fewest slots that hold them,
        and come back when fewer would do. (On a mesh every shard runs the largest
        shard's count.)"""
        ec = self.config
        if call.waiting:
            return self.slots, min(len(call.waiting), ec.admit_after or max(1, self.slots // 4))
        call.compact()
        counts = _slot_counts(self.slots, ec.min_slots)
        size = min(c for c in counts if c >= len(call.held))
        smaller = [c for c in counts if c < size]
        return size, (len(call.held) - max(smaller) if smaller else 0)

    def _admit(self, params, calls: list[_Call]) -> None:
        """Fills free slots with waiting rows: shared prompt pages looked up, the rest
        allocated and prefilled (first samples of new prompts first, so that their
        siblings admitted with them find the pages in the prefix cache)."""
        groups = [self._take_waiting(call) for call in calls]
        for group in range(2):
            chunks = [self._place(call, taken[group]) for call, taken in zip(calls, groups)]
            self._prefill(params, calls, chunks)
            page = self.config.page_size
            for call, spans in zip(calls, chunks):
                for slot, ids, start, cached in spans:  # now written: shareable
                    pages = call.held[slot].pages
                    for j, key in enumerate(prefix_keys(ids, page, cached)):
                        if j * page >= start:
                            call.pool.register(key, pages[j])

    def _take_waiting(self, call: _Call) -> tuple[list, list]:
        """(slot, row) pairs for the free slots the pool has pages for: the first
        samples of this round's prompts, then their siblings."""
        k = call.k
        first, later = [], []
        prompts_now = set()
        budget = call.pool.available()
        for slot in (s for s in range(self.slots) if s not in call.held):
            if not call.waiting:
                break
            row = call.waiting[0]
            # Pages for the prompt and a first step (shared ones counted as if not).
            need = self._pages_for(len(call.prompt_ids[row // k]))
            if need > budget:
                break
            budget -= need
            prompt = call.waiting.popleft() // k
            (later if prompt in prompts_now else first).append((slot, row))
            prompts_now.add(prompt)
        return first, later

    def _place(self, call: _Call, taken: list) -> list:
        """Puts the rows in their slots with their pages; returns the prompt spans
        (slot, ids, start, end) to prefill (what the prefix cache did not hold)."""
        page, k, slots = self.config.page_size, call.k, call.slots
        chunks = []
        for slot, row in taken:
            ids = call.prompt_ids[row // k]
            cached = len(ids) - 1  # the last token is the first decode step's
            shared = call.pool.lookup(prefix_keys(ids, page, cached))
            pages = shared + call.pool.allocate(self._pages_for(cached) - len(shared))
            call.held[slot] = _Row(row=row, pages=pages, prompt_length=len(ids))
            call.admitted.append(slot)
            self.stats["shared_pages"] += len(shared)
            if len(shared) * page < cached:
                chunks.append((slot, ids, len(shared) * page, cached))
            slots["page_table"][slot] = 0
            slots["page_table"][slot, : len(pages)] = pages
            slots["row"][slot], slots["live"][slot] = row, True
            slots["result_row"][slot] = call.result_row(row)
            slots["token"][slot], slots["position"][slot] = ids[-1], len(ids) - 1
            slots["generated"][slot], slots["greedy"][slot] = 0, row % k == 0
            slots["recent"][slot], slots["given"][slot] = -1, False
        return chunks

    def _prefill(self, params, calls: list[_Call], chunks: list[list]):
        """Prefills every shard's (slot, ids, start, end) spans, prefill_chunk tokens per
        slot and call, all shards in one program a round."""
        step = self.config.prefill_chunk
        chunks = [list(todo) for todo in chunks]  # the caller's lists stay whole
        while any(chunks):
            spans = [span for shard in chunks for span in shard]
            width = _bucket(max(min(end - start, step) for _, _, start, end in spans), step)
            batch = _bucket(max(len(shard) for shard in chunks), self.slots)
            tokens = np.zeros((self.shards, batch, width), np.int32)
            positions = np.zeros((self.shards, batch, width), np.int32)
            mask = np.zeros((self.shards, batch, width), bool)
            table = np.zeros((self.shards, batch, calls[0].slots["page_table"].shape[1]), np.int32)
            for shard, (call, todo) in enumerate(zip(calls, chunks)):
                for i, (slot, ids, start, end) in enumerate(todo[:batch]):
                    n = min(end - start, width)
                    tokens[shard, i, :n] = ids[start : start + n]
                    positions[shard, i, :n] = np.arange(start, start + n)
                    mask[shard, i, :n] = True
                    table[shard, i] = call.slots["page_table"][slot]
                    self.stats["prefilled_tokens"] += n
            flat = [x.reshape(-1, *x.shape[2:]) for x in (tokens, positions, mask, table)]
            if self.mesh is None:
                self._pool = prefill(self.model, params, self._pool, *flat)
            else:
                flat = self._put(flat)
                self._pool = prefill_sharded(self.model, self.mesh, params, self._pool, *flat)
            self.stats["prefill_calls"] += 1
            for shard, todo in enumerate(chunks):
                rest = [(s, ids, start + width, end) for s, ids, start, end in todo[:batch]]
                chunks[shard] = [c for c in rest if c[2] < c[3]] + todo[batch:]

    def _reserve(self, call: _Call) -> int:
        """Pages for every live slot's next steps: the longest horizon (halving from
        decode_horizon) the pool holds; when not even one step fits, the youngest row
        goes back to the queue (its pages freed; it is recomputed exactly later)."""
        slots = call.slots
        while True:
            horizon = self.config.decode_horizon
            while horizon >= 1:
                need = {}
                for slot, info in call.held.items():
                    last = min(slots["position"][slot] + horizon, info.prompt_length - 1 + call.new)
                    need[slot] = max(0, self._pages_for(last) - len(info.pages))
                if sum(need.values()) <= call.pool.available():
                    for slot, n in need.items():
                        if n:
                            info = call.held[slot]
                            pages = call.pool.allocate(n)
                            slots["page_table"][slot, len(info.pages) : len(info.pages) + n] = pages
                            info.pages.extend(pages)
                    return horizon
                horizon //= 2
            if len(call.held) == 1:
                raise PoolExhausted("One row does not fit the page pool; raise kv_cache_bytes.")
            victim = call.admitted.pop()
            info = call.held.pop(victim)
            call.pool.release(info.pages)
            call.waiting.appendleft(info.row)
            call.free(victim)
            self.stats["preempted"] += 1


def _prompt_major(r: Results, n_prompts: int, k: int, shards: int) -> Results:
    """Every shard's Results (prompt p's rows in shard p mod shards) in the call's order."""
    if shards == 1:
        return jax.tree.map(lambda x: x[: n_prompts * k], r)
    per_shard = r.lengths.shape[0] // shards
    index = [
        p % shards * per_shard + p // shards * k + j for p in range(n_prompts) for j in range(k)
    ]
    return jax.tree.map(lambda x: x[index], r)


def _rollout(prompt_ids, k, r: Results, width: int, pad_id: int) -> Rollout:
    """The call's results as the static sampler's Rollout (prompts left-padded to width)."""
    prompt_tokens, prompt_mask = left_pad(prompt_ids, width, pad_id)
    new = r.tokens.shape[1]
    return Rollout(
        prompt_tokens=np.repeat(prompt_tokens, k, axis=0),
        prompt_mask=np.repeat(prompt_mask, k, axis=0),
        completion_tokens=r.tokens,
        completion_mask=np.arange(new)[None, :] < r.lengths[:, None],
        logprobs=r.logprobs,
        sampling_logprobs=r.sampling_logprobs,
        lengths=r.lengths,
        finish_reason=r.finish_reason,
        decode_steps=r.lengths,
    )

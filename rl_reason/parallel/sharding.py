"""From logical axis names to mesh shardings.

Parameters, caches and activations are annotated with logical names (embed,
mlp, heads, ...); a list of rules, kept in config, maps each name to mesh axes
(MaxText's scheme). A rule is skipped for a dimension that the mesh axes do
not divide, so one rule set serves every model size (e.g. Gemma 3 270M's
single KV head stays replicated on a tensor axis of 2).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

# Parameters are FSDP-sharded on `embed` and tensor-parallel on heads / mlp /
# vocab; the batch is split over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("norm", None),
    ("act_embed", None),
)

BATCH_AXES = ("data", "fsdp")


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    names: Optional[Sequence[Optional[str]]], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> P:
    """The PartitionSpec for one array; rules that do not divide it are skipped."""
    if names is None:
        return P()
    rule_map: dict[str, list[tuple[str, ...]]] = {}
    for name, axes in rules:
        rule_map.setdefault(name, []).append(_as_tuple(axes))
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        chosen: tuple[str, ...] = ()
        for axes in rule_map.get(name, []) if name is not None else []:
            free = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
            if free and size % math.prod(mesh.shape[a] for a in free) == 0:
                chosen = free
                break
        used.update(chosen)
        spec.append(chosen[0] if len(chosen) == 1 else (chosen or None))
    return P(*spec)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (possibly) logically partitioned values.

    `abstract_boxed` is what `jax.eval_shape` returns for a Flax init: leaves are
    nn.LogicallyPartitioned boxes (or plain arrays, which are replicated). The
    result has the structure of the unboxed tree.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            return NamedSharding(mesh, logical_to_spec(leaf.names, value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(
        one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def param_shardings(init_fn: Callable[[jax.Array], Any], mesh: Mesh, rules: Rules) -> Any:
    """Shardings of the unboxed params that `init_fn(rng)` returns, from its logical
    names and shapes alone (`jax.eval_shape`: nothing is allocated)."""
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    return logical_shardings(abstract, mesh, rules)


def named_sharding(
    mesh: Mesh, rules: Rules, names: Sequence[Optional[str]], shape: Sequence[int]
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def check_batch_divides(batch_size: int, mesh: Mesh, what: str = "batch") -> None:
    shards = batch_shards(mesh)
    if batch_size % shards:
        raise ValueError(
            f"The {what} size {batch_size} is not divisible by the {shards} batch"
            f" shards of the mesh (data x fsdp = {dict(mesh.shape)}); choose a"
            f" multiple of {shards}."
        )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading dimension over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def process_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
    """The rows of a global batch that this process feeds, in the order
    `jax.make_array_from_process_local_data` expects them.

    They are the rows its own devices hold under the batch sharding, found from
    the sharding rather than assumed from the process index: on a mesh whose
    devices are not laid out host by host, a process's rows need not be the
    p-th contiguous slice. On one process: every row, in order.
    """
    check_batch_divides(global_batch, mesh)
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,))
    ranges = {(idx[0].start or 0, idx[0].stop or global_batch) for idx in index_map.values()}
    return np.concatenate([np.arange(a, b) for a, b in sorted(ranges)])


def shard_process_rows(local: Any, mesh: Mesh, global_batch: int) -> Any:
    """Builds global arrays from this process's rows (`process_rows`) of a global
    batch: each process reads and tokenizes only its own examples."""

    def put(x):
        x = np.asarray(x)
        shape = (global_batch,) + x.shape[1:]
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, shape)

    return jax.tree.map(put, local)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a global host batch on the mesh, split over the batch axes.

    Every process holds the same global batch (rollouts, scores and labels are
    computed identically on each, or gathered with `to_host`) and contributes
    the rows its devices hold. A loader that reads only its own rows uses
    `process_rows` and `shard_process_rows` instead.
    """
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"The arrays of a batch disagree on its size: {sorted(sizes)}.")
    (global_batch,) = sizes
    rows = process_rows(mesh, global_batch)
    every = jax.process_count() == 1
    local = jax.tree.map(lambda x: np.asarray(x) if every else np.asarray(x)[rows], batch)
    return shard_process_rows(local, mesh, global_batch)


def to_host(tree: Any) -> Any:
    """Numpy copies of a tree of arrays, on every process.

    `jax.device_get` reads only arrays whose shards are all on this process (or
    replicated); a batch-sharded array on a mesh spanning several processes is
    gathered from them first, so every process sees the whole result.
    """

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


@contextlib.contextmanager
def activation_sharding(mesh: Optional[Mesh], rules: Rules):
    """Context under which the model's activation constraints take effect."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield


def rules_from_config(rules: Iterable) -> tuple[tuple[str, Any], ...]:
    """Normalises rules read from a config (lists become tuples)."""
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"A sharding rule is (logical_name, mesh_axes); got {rule!r}.")
        name, axes = rule
        axes = None if axes is None else (axes if isinstance(axes, str) else tuple(axes))
        out.append((name, axes))
    return tuple(out)


def abstract_like(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings (e.g. a restore target)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )

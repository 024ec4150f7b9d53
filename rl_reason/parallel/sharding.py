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


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host batch on the mesh, split over the batch axes.

    Each process passes its own slice of the global batch (on one host: the
    whole batch), as `jax.make_array_from_process_local_data` expects.
    """

    def put(x):
        x = np.asarray(x)
        global_batch = x.shape[0] * jax.process_count()
        check_batch_divides(global_batch, mesh)
        return jax.make_array_from_process_local_data(
            batch_sharding(mesh, x.ndim), x, (global_batch,) + x.shape[1:]
        )

    return jax.tree.map(put, batch)


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

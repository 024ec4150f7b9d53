"""Mesh construction, logical rules and batch placement."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd


def test_mesh_fills_minus_one_with_remaining_devices():
    mesh = mesh_lib.make_mesh((2, -1, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 1, 1), "needs 3 devices but 8"),
        ((3, -1, 1), "not a multiple of 3"),
        ((-1, -1, 1), "at most one -1"),
    ],
)
def test_impossible_meshes_are_clear_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.make_mesh(shape)


def test_rules_skip_axes_that_do_not_divide():
    mesh = mesh_lib.make_mesh((1, 4, 2))
    spec = shd.logical_to_spec(
        ("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh, shd.DEFAULT_RULES
    )
    assert spec == P("fsdp", None, None)  # one KV head cannot be split two ways
    spec = shd.logical_to_spec(
        ("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh, shd.DEFAULT_RULES
    )
    assert spec == P("fsdp", "tensor", None)


def test_a_mesh_axis_is_used_once_per_array():
    mesh = mesh_lib.make_mesh((1, 4, 2))
    rules = (("vocab", "tensor"), ("embed", "tensor"))
    assert shd.logical_to_spec(("vocab", "embed"), (8, 8), mesh, rules) == P("tensor", None)


def test_batch_is_split_over_data_and_fsdp():
    mesh = mesh_lib.make_mesh((2, 2, 2))
    batch = shd.shard_batch({"tokens": np.arange(32).reshape(8, 4)}, mesh)
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), np.arange(32).reshape(8, 4))


def test_indivisible_batch_is_a_clear_error():
    mesh = mesh_lib.make_mesh((4, 2, 1))
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        shd.shard_batch({"tokens": np.zeros((6, 4), np.int32)}, mesh)

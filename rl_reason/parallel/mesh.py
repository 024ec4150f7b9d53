"""Device mesh construction (multi-host start-up is `distributed`)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXIS_NAMES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a single -1 with the devices that remain; checks the product."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"Mesh shape {shape}: use positive sizes and at most one -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"Mesh shape {shape} cannot fit {num_devices} devices: {num_devices}"
                f" is not a multiple of {known}."
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"Mesh shape {shape} needs {math.prod(shape)} devices but {num_devices} are available."
        )
    return shape


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1),
    axis_names: Sequence[str] = AXIS_NAMES,
    devices: Optional[Sequence[jax.Device]] = None,
) -> Mesh:
    """A mesh with Auto axis types, so ordinary model code is partitioned by GSPMD."""
    if len(shape) != len(axis_names):
        raise ValueError(f"Mesh shape {tuple(shape)} does not match axes {tuple(axis_names)}.")
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))
    return Mesh(
        np.asarray(devices).reshape(shape),
        tuple(axis_names),
        axis_types=(AxisType.Auto,) * len(shape),
    )

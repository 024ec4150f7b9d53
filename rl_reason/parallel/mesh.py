"""Device mesh construction and multi-host start-up."""

from __future__ import annotations

import logging
import math
import os
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


def maybe_initialize_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    timeout_seconds: int = 300,
) -> bool:
    """Calls jax.distributed.initialize when the config or environment asks for it.

    Multi-host runs are requested by a coordinator address in the config or by
    the environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID (set by the launchers); TPU pods are detected by JAX itself
    when RL_REASON_DISTRIBUTED=1. Returns whether initialisation happened. A
    bounded timeout means a missing peer is an error, not a silent hang.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(env.get("JAX_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(env.get("JAX_PROCESS_ID", "-1"))
    auto = env.get("RL_REASON_DISTRIBUTED", "") == "1"
    if not (coordinator_address or auto):
        return False
    kwargs = {"initialization_timeout": timeout_seconds}
    if coordinator_address:
        kwargs.update(
            coordinator_address=coordinator_address,
            num_processes=num_processes or None,
            process_id=process_id if process_id >= 0 else None,
        )
    logging.info("jax.distributed.initialize(%s)", kwargs)
    jax.distributed.initialize(**kwargs)
    return True

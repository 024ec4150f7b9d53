"""Orbax checkpoints of a run: the train state and the run's progress, saved together.

A checkpoint is two items written atomically under one step directory:
`state` (the TrainState pytree, sharded arrays written by every host) and
`progress` (JSON: data-iterator position, algorithm progress such as the EI
round, anything else the experiment needs to continue exactly). Restoring
targets the shardings of the current mesh, which may differ from the mesh
that saved.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import orbax.checkpoint as ocp


class Checkpointer:
    """Keep-N, interval-saving, asynchronous checkpoint manager for one run."""

    def __init__(
        self,
        directory: str,
        *,
        save_interval_steps: int = 100,
        max_to_keep: int = 3,
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, save_interval_steps),
            max_to_keep=max_to_keep if max_to_keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "progress")
        )

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, progress: dict[str, Any], force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether it did."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
            ),
            force=force,
        )

    def restore(
        self, abstract_state: Any, step: Optional[int] = None
    ) -> tuple[Any, dict[str, Any]]:
        """Restores (state, progress) into the shardings carried by `abstract_state`.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set,
        e.g. from `train_state.abstract_train_state`.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()
            ),
        )
        logging.info("Restored checkpoint %d from %s", step, self.directory)
        return restored["state"], dict(restored["progress"])

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

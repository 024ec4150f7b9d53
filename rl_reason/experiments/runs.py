"""What every training run shares: its workdir's record, resume checks, the finite gate.

A run's `config.json` describes its checkpoints, so it is written only once
the run has restored (or created) its state under this config, atomically,
and a resume whose config changes what the checkpoints mean (the model, the
data, the seed, the algorithm's shapes) stops first with the keys that differ
instead of failing in a restore (or, worse, silently continuing).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rl_reason import checkpointing
from rl_reason import logging as run_logging
from rl_reason.algorithms import expert_iteration as ei
from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.parallel import distributed
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd

# Sections (or top-level keys) a resumed run may not change.
LOCKED_KEYS = ("seed", "model", "data")


class ResumeConfigError(ValueError):
    """The config asks to resume a run with a different model, data or seed."""


class NonFiniteStepError(FloatingPointError):
    """A step produced NaN or inf; nothing from it was saved."""


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def check_resume_config(
    config: ml_collections.ConfigDict, workdir: str, locked: Iterable[str] = LOCKED_KEYS
) -> None:
    """Raises ResumeConfigError naming every locked key whose value differs from
    the run's saved config.json (nothing to check for a new run)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = _flatten(json.load(f))
    current = _flatten(config_dict(config))
    prefixes = tuple(locked)
    differ = [
        f"{key}: {saved.get(key, '<absent>')!r} in the run, {current.get(key, '<absent>')!r} now"
        for key in sorted(set(saved) | set(current))
        if key.split(".")[0] in prefixes and saved.get(key) != current.get(key)
    ]
    if differ:
        raise ResumeConfigError(
            f"{workdir} holds a run with a different config; its checkpoints do not fit:\n  "
            + "\n  ".join(differ)
            + "\nUse a new --workdir, or the run's own values."
        )


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """config.json, atomically, by the lead process."""
    if jax.process_index() == 0:
        checkpointing.write_json_atomic(os.path.join(workdir, "config.json"), config_dict(config))


def write_run_record(config: ml_collections.ConfigDict, workdir: str, tokenizer: Any) -> None:
    """What a run started from a model source records beside its checkpoints: the
    tokenizer its samples are read with (once) and config.json (each time it runs)."""
    directory = os.path.join(workdir, "tokenizer")
    if jax.process_index() == 0 and not os.path.isdir(directory):
        tokenizer_lib.save_tokenizer(tokenizer, directory)
    write_config(config, workdir)


def check_finite(metrics: Mapping[str, Any], where: str, last_checkpoint: Optional[int]) -> None:
    """Raises NonFiniteStepError when the step's `finite` flag is off, naming what is not finite."""
    if float(metrics.get("finite", 1.0)) == 1.0:
        return
    bad = [
        f"{key}={float(value)}"
        for key, value in metrics.items()
        if np.size(value) == 1 and not np.isfinite(float(value))
    ]
    kept = (
        f"the last checkpoint, step {last_checkpoint}, is intact"
        if last_checkpoint is not None
        else "no checkpoint was written"
    )
    raise NonFiniteStepError(
        f"{where} is not finite ({', '.join(bad) or 'updated parameters'}); nothing from it was"
        f" saved and {kept}. Lower optim.lr, check the data or the rewards."
    )


def start(
    config: ml_collections.ConfigDict, workdir: str, validate: Callable[[Any], None]
) -> tuple[Mesh, tuple]:
    """What every run does first: join the other hosts, check the config (`validate`)
    and that it may resume the workdir's run, then build the mesh and its rules."""
    distributed.initialize(**config.distributed)
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    check_resume_config(config, workdir)
    mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.axis_names)
    return mesh, shd.rules_from_config(config.mesh.rules)


def make_checkpointer(
    config: ml_collections.ConfigDict, workdir: str
) -> checkpointing.Checkpointer:
    """The run's checkpointer, as its `checkpoint` section says.

    A run whose every checkpoint was found damaged and quarantined is not
    silently started over (that would also truncate its metrics): it is an
    error saying where the damaged checkpoints are.
    """
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_interval_steps=config.checkpoint.save_interval_steps,
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
    )
    if checkpointer.latest_step() is None and checkpointer.quarantined():
        checkpointer.close()
        raise checkpointing.CorruptCheckpointError(
            f"Every checkpoint of the run in {workdir} was damaged and moved to"
            f" {checkpointer.quarantine_directory}; there is nothing intact to resume from."
            " Use a new --workdir to start over (the damaged checkpoints are kept)."
        )
    return checkpointer


def write_solutions(path: str, solutions, record_type: type = ei.Solution) -> None:
    """Scored samples (EI's kept solutions, the ORM's labelled samples, RCRL's labelled
    ones: records of `record_type`) as checksummed JSON lines (``ei.to_jsonl``),
    written atomically by the lead process. Every process calls it, and none returns
    before the file is there: the others may read it next (a round's chunks)."""
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        checkpointing.write_bytes_atomic(path, ei.to_jsonl(solutions, record_type))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"wrote {path}")


def read_solutions(
    path: str, digest: str | None = None, record_type: type = ei.Solution
) -> ei.Dataset:
    """What `write_solutions` wrote; a damaged file, or one whose digest is not the
    one the checkpoint recorded, is a CorruptCheckpointError naming it."""
    with open(path, "rb") as f:
        try:
            dataset = ei.from_jsonl(f.read(), record_type)
        except ValueError as e:
            raise checkpointing.CorruptCheckpointError(f"{path}: {e}") from None
    if digest is not None and ei.dataset_digest(dataset) != digest:
        raise checkpointing.CorruptCheckpointError(
            f"{path} is not the dataset the checkpoint recorded (digest differs)."
        )
    return dataset


def finished_record(workdir: str) -> dict[str, Any]:
    """The last metrics record of a run that has nothing left to do."""
    records = run_logging.read_metrics(workdir)
    return records[-1] if records else {}

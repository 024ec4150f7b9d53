"""One run's life in its workdir, the same for every learner: `Run`.

    with runs.Run(config, workdir, validate_ei) as run:
        restored = run.restore(targets)          # None: a fresh run
        if finished: return run.finished("...")
        run.begin(tokenizer, resume_step)        # config.json, metrics, signals
        ...                                      # the learner's loop
        run.log(step, record)
        run.checkpoint(step, items, progress, force=..., finished=...)

A run's `config.json` describes its checkpoints, so it is written only once
the run has restored (or created) its state under this config, atomically,
and a resume whose config changes what the checkpoints mean (the model, the
data, the seed, the algorithm's shapes) stops first with the keys that differ
instead of failing in a restore (or, worse, silently continuing). SIGTERM or
SIGINT saves at the next `checkpoint` and raises `checkpointing.Preempted`;
leaving the `with` block waits for the last save, inside the signal guard.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from rl_reason import checkpointing
from rl_reason import logging as run_logging
from rl_reason import workdir_lock
from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.experiments import config as config_lib
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
        saved = config_lib.with_moved_keys(_flatten(json.load(f)))
    current = _flatten(config_dict(config))
    prefixes = tuple(locked)
    # A key the run's config.json lacks is a setting added to rl_reason since the run
    # began (e.g. model.attention): the run could not have set it, so it is not checked.
    differ = [
        f"{key}: {saved.get(key, '<absent>')!r} in the run, {current.get(key, '<absent>')!r} now"
        for key in sorted(saved)
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
    config: ml_collections.ConfigDict,
    workdir: str,
    validate: Callable[[Any], None],
    *,
    resumes: bool = True,
) -> tuple[Mesh, tuple]:
    """What every run does first: join the other hosts, check the config (`validate`)
    and, for a run that `resumes` from checkpoints, that it may resume the workdir's
    run, then build the mesh and its rules."""
    distributed.initialize(**config.distributed)
    validate(config)  # naming moved keys as the config sets them (config.MOVED_KEYS)
    config_lib.resolve_moved_keys(config)
    os.makedirs(workdir, exist_ok=True)
    if resumes:
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


class Run:
    """The lifecycle every training loop shares (see the module docstring).

    Entering starts the processes and the mesh (`start`), takes the workdir's lock
    (`workdir_lock.hold_workdir`: one run per workdir), checks the resume
    (`locked`: further config sections the run may not change) and opens the
    checkpointer; `begin` writes the run record, opens the metric writer
    (truncated to `resume_step`: records past the checkpoint are redone) and
    installs the preemption guard; leaving waits for pending saves and closes.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        validate: Callable[[Any], None],
        *,
        locked: Iterable[str] = (),
    ):
        self.config, self.workdir = config, workdir
        self.mesh, self.rules = start(config, workdir, validate)
        self.writer: Optional[run_logging.MetricWriter] = None
        self._guard: Optional[checkpointing.PreemptionGuard] = None
        # One run per workdir: process 0 holds the lock for the run's life; a second
        # start is refused naming the holder (every process learns the verdict).
        self._held = contextlib.ExitStack()
        self._held.enter_context(workdir_lock.hold_workdir(workdir))
        try:
            if locked:
                check_resume_config(config, workdir, locked)
            self.checkpointer = make_checkpointer(config, workdir)
        except BaseException:
            self._held.close()
            raise

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.checkpointer.wait()
        finally:
            self.checkpointer.close()
            if self.writer is not None:
                self.writer.close()
            if self._guard is not None:
                self._guard.__exit__(*exc)
            self._held.close()

    @property
    def show_progress(self) -> bool:
        """Progress bars: the lead process's, when the config asks for them."""
        return bool(self.config.logging.progress_bar) and jax.process_index() == 0

    def restore(self, targets: Mapping[str, Any]) -> Optional[tuple[dict[str, Any], dict]]:
        """(items, progress) of the newest intact checkpoint, restored into `targets`
        (abstract items); None for a run with no checkpoint yet."""
        if self.checkpointer.latest_step() is None:
            return None
        items, progress, _ = self.checkpointer.restore(targets)
        return items, progress

    def finished(self, message: str) -> dict[str, Any]:
        """What a rerun of a finished run returns: it changes nothing, config.json included."""
        print(f"The run in {self.workdir} {message}; nothing to do.")
        return finished_record(self.workdir)

    def begin(self, tokenizer: Any, resume_step: Optional[int]) -> None:
        """The run record (tokenizer, config.json), the metric writer and the signal guard."""
        write_run_record(self.config, self.workdir, tokenizer)
        self.writer = run_logging.MetricWriter(
            self.workdir,
            tensorboard=self.config.logging.tensorboard,
            resume_step=resume_step or None,  # None: a fresh run keeps no stale record
            **logging_backends(self.config),
        )
        self._guard = checkpointing.PreemptionGuard().__enter__()

    def log(self, step: int, record: Mapping[str, Any]) -> dict[str, Any]:
        return self.writer.write(step, record)

    def check_finite(self, metrics: Mapping[str, Any], where: str) -> None:
        """`check_finite` against this run's last checkpoint."""
        check_finite(metrics, where, self.checkpointer.latest_step())

    def checkpoint(
        self,
        step: int,
        items: Mapping[str, Any],
        progress: Mapping[str, Any],
        *,
        force: bool = False,
        finished: bool = False,
    ) -> None:
        """Saves on the interval (always when `force`, or when a signal came), then stops
        with `Preempted` if a signal came and the run is not `finished`."""
        stop = self._guard.should_stop(step)
        self.checkpointer.save(step, items, progress, force=force or stop)
        if stop and not finished:  # a finished run has nothing to resume
            raise checkpointing.Preempted(step, self.workdir)


def logging_backends(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """MetricWriter's further backends from the `logging` section (none in a config
    written before there were any)."""
    section = config.logging
    settings = section.get("wandb")
    return {
        "backends": tuple(section.get("backends", ())),
        "wandb": settings.to_dict() if settings is not None else None,
    }


def finished_record(workdir: str) -> dict[str, Any]:
    """The last metrics record of a run that has nothing left to do."""
    records = run_logging.read_metrics(workdir)
    return records[-1] if records else {}

"""Run metrics to workdir/metrics.jsonl and TensorBoard (and, optionally, Weights &
Biases), from the lead process only."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from rl_reason.files import fsync_path


def _scalar(value: Any) -> Any:
    value = np.asarray(value)
    if value.size != 1:
        raise ValueError(f"Metric of shape {value.shape} is not a scalar.")
    value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


class MetricWriter:
    """Appends {"step": s, **metrics} records; a resumed run drops records past its checkpoint.

    metrics.jsonl is the record of truth. TensorBoard mirrors it: every write is
    on disk when `write` returns (events go to the file directly, not through
    tensorboardX's SummaryWriter, whose queue thread can hold them past its own
    flush), and a resumed run rewrites the event files from the (truncated)
    metrics.jsonl, so after any kill and resume the two hold the same points (a
    writer that buffers for two minutes and a resume that does not purge lose
    or duplicate them).
    """

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        resume_step: Optional[int] = None,
        backends: Sequence[str] = (),
        wandb: Optional[Mapping[str, Any]] = None,
    ):
        """`backends`: further mirrors of metrics.jsonl (BACKENDS; "tensorboard" there is
        `tensorboard=True`), `wandb` the W&B run's settings (`WandbMirror`)."""
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._mirrors: list[Any] = []
        check_backends(backends)
        tensorboard = tensorboard or "tensorboard" in backends
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        # A fresh run (resume_step None) keeps nothing, not even a step-0 record of
        # a start that was killed before its first checkpoint.
        self._truncate_after(-1 if resume_step is None else resume_step)
        if tensorboard:
            from tensorboardX.event_file_writer import EventsWriter

            tb_dir = os.path.join(workdir, "tensorboard")
            if os.path.isdir(tb_dir):
                shutil.rmtree(tb_dir)
            os.makedirs(tb_dir)
            self._tb = EventsWriter(os.path.join(tb_dir, "events"))
            for record in read_metrics(workdir) if os.path.exists(self.path) else []:
                self._add_scalars(record)
            self._tb.flush()
        self._mirrors = open_mirrors(workdir, backends, wandb)

    def _add_scalars(self, record: Mapping[str, Any]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [
            Summary.Value(tag=key, simple_value=value)
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        if values:
            self._tb.write_event(
                Event(wall_time=time.time(), step=record["step"], summary=Summary(value=values))
            )

    def _truncate_after(self, step: int) -> None:
        """Keeps only records up to `step`: those after it are about to be redone. The
        rewrite is synced before it replaces the file, and the directory after, so a
        crash leaves the old file or the new one, whole."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [
                line
                for number, line in enumerate(f, 1)
                if (record := _parse(line, self.path, number)) and record["step"] <= step
            ]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_path(os.path.dirname(self.path), missing_ok=True)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None:
                self._add_scalars(record)
                self._tb.flush()
            for mirror in self._mirrors:
                mirror.write(record)
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for mirror in self._mirrors:
            mirror.close()
        self._mirrors = []


class MetricsFileError(ValueError):
    """metrics.jsonl holds a line that is JSON but not a record ({"step": int, ...})."""


def _parse(line: str, path: str = "metrics.jsonl", number: int = 0) -> Optional[dict[str, Any]]:
    """A record, or None for a blank line or one a kill cut short; a line that is
    valid JSON but not a record is a MetricsFileError naming its line."""
    try:
        record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    if record is None:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise MetricsFileError(
            f"{path}:{number}: not a metrics record (a JSON object with an integer"
            f" \"step\"): {line.strip()[:120]!r}. Remove or fix that line."
        )
    return record


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """Every record of workdir/metrics.jsonl ([] when there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [record for number, line in enumerate(f, 1) if (record := _parse(line, path, number))]


# --- further backends: mirrors of metrics.jsonl ---------------------------------------
# A mirror is opened after metrics.jsonl was truncated to the resumed step, replays every
# record left in it, then receives each record `write` appends: after any kill and
# resume it holds what metrics.jsonl holds, as TensorBoard's events do.

BACKENDS = ("tensorboard", "wandb")


def check_backends(backends: Sequence[str]) -> None:
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        raise ValueError(f"logging.backends names {unknown}; known backends: {BACKENDS}.")


def scalar_points(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's plottable values, as TensorBoard takes them: numbers, not the
    step, not booleans, not the strings that stand for NaN and inf."""
    return {
        key: value
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def open_mirrors(
    workdir: str, backends: Sequence[str], wandb: Optional[Mapping[str, Any]]
) -> list[Any]:
    """The mirrors `backends` names beyond TensorBoard, each rebuilt from metrics.jsonl."""
    mirrors = []
    if "wandb" in backends:
        mirrors.append(WandbMirror(workdir, dict(wandb or {}), read_metrics(workdir)))
    return mirrors


class WandbMirror:
    """metrics.jsonl mirrored into a Weights & Biases run.

    Every open starts a new W&B run and replays the (truncated) metrics.jsonl
    into it, then logs each new record at its step: the newest run holds
    exactly what metrics.jsonl holds, as the rebuilt TensorBoard events do. The
    local `wandb/` directory of the workdir is removed first, as `tensorboard/`
    is, so that in offline mode (`WANDB_MODE=offline` or `mode="offline"`) it
    holds one run to `wandb sync`. Online, an earlier attempt's run stays on
    the server; all attempts share the run's name and group, and
    `wandb_run.json` in the workdir names the current run and the superseded
    ones. Settings (the `logging.wandb` config section): project, entity,
    name (default: the workdir's name), group (default: the name), tags, mode
    ("" = W&B's own default: WANDB_MODE, else online). The run's config is the
    workdir's config.json.
    """

    def __init__(self, workdir: str, settings: Mapping[str, Any], records: Sequence[Mapping]):
        self._run = start_wandb_run(_import_wandb(), workdir, settings)
        self._step = -1
        for record in records:
            self.write(record)

    def write(self, record: Mapping[str, Any]) -> None:
        points = scalar_points(record)
        if not points:
            return
        step = int(record["step"])
        if step < self._step:
            # W&B keeps history rows in rising step order and drops an earlier one; the
            # loops' global step only rises, so this is a record written out of order.
            warnings.warn(
                f"W&B: metrics of step {step} after step {self._step} are in metrics.jsonl"
                " and TensorBoard but not in the W&B run (its steps only rise)."
            )
            return
        self._run.log(points, step=step)
        self._step = step

    def close(self) -> None:
        self._run.finish()


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "logging.backends names 'wandb' but the wandb package is not installed:"
            " `pip install wandb`, or drop 'wandb' from logging.backends."
        ) from e
    return wandb


def start_wandb_run(wandb: Any, workdir: str, settings: Mapping[str, Any]) -> Any:
    """A new W&B run for `workdir` (see `WandbMirror`): its local `wandb/` directory
    rebuilt, config.json as the run's config, the attempt recorded in wandb_run.json."""
    local = os.path.join(workdir, "wandb")
    if os.path.isdir(local):
        shutil.rmtree(local)
    os.makedirs(local)
    config_path = os.path.join(workdir, "config.json")
    config = None
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
    name = settings.get("name") or os.path.basename(os.path.abspath(workdir))
    run = wandb.init(
        dir=workdir,
        project=settings.get("project") or "rl_reason",
        entity=settings.get("entity") or None,
        name=name,
        group=settings.get("group") or name,
        tags=list(settings.get("tags") or ()) or None,
        mode=settings.get("mode") or None,
        config=config,
        reinit="create_new",
        settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False),
    )
    _record_wandb_attempt(workdir, run.id)
    return run


def _record_wandb_attempt(workdir: str, run_id: str) -> None:
    """wandb_run.json: the current W&B run of the workdir and those it superseded."""
    path = os.path.join(workdir, "wandb_run.json")
    superseded: list[str] = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                previous = json.load(f)
            superseded = [*previous.get("superseded", []), previous["current"]]
        except (OSError, ValueError, KeyError, TypeError):
            superseded = []
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"current": run_id, "superseded": superseded}, f)
    os.replace(tmp, path)


def wandb_report(
    workdir: str,
    settings: Mapping[str, Any],
    *,
    table: tuple[Sequence[str], Sequence[Sequence[Any]]],
    images: Sequence[str] = (),
    files: Sequence[str] = (),
) -> str:
    """A report (the study's) as a W&B run of its own: `table` (columns, rows) as a
    W&B table "results", every image file (`images`, paths) as an image under its
    file name, and `files` (report.md) saved with the run. Like the mirrors, it is
    rebuilt from the workdir's files each time it is written. Returns the run id."""
    wandb = _import_wandb()
    run = start_wandb_run(wandb, workdir, settings)
    try:
        columns, rows = table
        values = {"results": wandb.Table(columns=list(columns), data=[list(r) for r in rows])}
        for path in images:
            values[os.path.splitext(os.path.basename(path))[0]] = wandb.Image(path)
        run.log(values)
        for path in files:  # what is in the run's directory is uploaded with it
            shutil.copy(path, os.path.join(run.dir, os.path.basename(path)))
        return run.id
    finally:
        run.finish()

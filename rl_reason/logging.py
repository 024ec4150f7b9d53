"""Run metrics to workdir/metrics.jsonl and TensorBoard, from the lead process only."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np


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
        self, workdir: str, *, tensorboard: bool = True, resume_step: Optional[int] = None
    ):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
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
        _fsync_directory(os.path.dirname(self.path))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None:
                self._add_scalars(record)
                self._tb.flush()
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """Every record of workdir/metrics.jsonl ([] when there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [record for number, line in enumerate(f, 1) if (record := _parse(line, path, number))]

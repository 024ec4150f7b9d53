"""Run metrics to workdir/metrics.jsonl and TensorBoard, from the lead process only."""

from __future__ import annotations

import json
import math
import os
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
    """Appends {"step": s, **metrics} records; a resumed run drops records past its checkpoint."""

    def __init__(
        self, workdir: str, *, tensorboard: bool = True, resume_step: Optional[int] = None
    ):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate_after(resume_step or 0)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Keeps only records up to `step`: those after it are about to be redone."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self._tb.add_scalar(key, value, step)
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]

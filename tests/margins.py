"""What the `results` tests share: the held-out margin they assert and how they read a run.

The `results` tier (`test_rl_margins.py`, `test_rcrl_margins.py`) runs shipped
configs from shipped SFT starts and asserts the README's margins; one module a
start, so that pytest-xdist runs the two starts' modules side by side.
"""

from __future__ import annotations

import json
import os

from rl_reason.experiments import sft

HELDOUT = 256
# One question is 0.4 points; the runs measured gain 8-17 points (README), and a
# start-to-end difference of 5 points on 256 questions is about 2.5 standard errors.
MARGIN = 0.05


def quiet(config):
    config.logging.update(progress_bar=False, tensorboard=False)
    return config


def heldout_records(workdir):
    """The run's held-out evaluations in order, the start model's first."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "heldout/maj@1" in r]


def train_start(tmp_path_factory, config, name):
    """A shipped SFT start trained into a fresh directory: the workdir its RL runs start from."""
    workdir = tmp_path_factory.mktemp(name)
    sft.train(quiet(config), str(workdir))
    return workdir

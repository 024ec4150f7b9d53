"""Training runs in separate processes, killed at points found by watching their workdir.

What the end-to-end kill tests share: the `launch/train.py` command of a config
file with overrides (`config_overrides` writes them from an in-process config),
a run to completion, and a run started and SIGKILLed (no handler, no save) as
soon as a condition on its files holds. They inherit this process's environment:
8 CPU devices and the session's JAX compilation cache (conftest.py), so only the
first process to run a program compiles it. Kill points are conditions on
what the run has written (records, chunk files, checkpoints), never step
numbers or times, so they hold whatever a loop's phases number their steps.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from rl_reason import checkpointing
from rl_reason import logging as run_logging

REPO_ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 900  # seconds: only a guard against a hang; nothing asserts how long anything takes


def train_command(workdir: Path, config_file: str | None = None, overrides=()) -> list[str]:
    """`python launch/train.py [--config=configs/<config_file>] --workdir=... <overrides>`."""
    command = [sys.executable, str(REPO_ROOT / "launch" / "train.py")]
    if config_file is not None:
        command.append(f"--config={REPO_ROOT / 'configs' / config_file}")
    return [*command, f"--workdir={workdir}", *overrides]


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_overrides(config, base) -> list[str]:
    """The `--config.KEY=VALUE` flags that turn config file `base` into `config`
    (ml_collections ConfigDicts; every changed leaf, none added or removed)."""
    want, have = _flatten(config.to_dict()), _flatten(base.to_dict())
    if set(want) != set(have):
        raise ValueError(f"keys differ: {sorted(set(want) ^ set(have))}")
    return [f"--config.{key}={value}" for key, value in want.items() if value != have[key]]


def run(command: list[str]) -> subprocess.CompletedProcess:
    """Runs `command` to its end; fails the test unless it exits 0."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def wait_for(proc: subprocess.Popen, condition: Callable[[], bool], what: str, log=None) -> None:
    """Polls until `condition()`; fails if the process exits first (its output, or the
    tail of `log` where it writes, in the message)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if proc.poll() is not None:
            if log is not None:
                output = Path(log).read_text()
            else:
                output = proc.communicate()[1] or ""
            pytest.fail(f"exited {proc.returncode} before {what}:\n{output[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {DEADLINE} s")
        time.sleep(0.02)


def kill_when(command: list[str], condition: Callable[[], bool], what: str, log: Path) -> None:
    """Starts `command` and SIGKILLs it as soon as `condition()` holds (it must come
    before the process ends). Its output goes to `log` (appended)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(proc, condition, what, log=log)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def records(workdir: Path) -> list[dict]:
    """metrics.jsonl of a running or killed process (a line being written is skipped)."""
    if not (Path(workdir) / "metrics.jsonl").exists():
        return []
    return run_logging.read_metrics(str(workdir))


def checkpoint_steps(workdir: Path) -> list[int]:
    """The finished checkpoints (Orbax renames a step's directory into place when done)."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def latest_progress(workdir: Path) -> dict | None:
    """The progress record of the run's latest checkpoint (None before the first)."""
    checkpointer = checkpointing.Checkpointer(str(Path(workdir) / "checkpoints"))
    try:
        step = checkpointer.latest_step()
        return None if step is None else checkpointer.read_progress(step)
    finally:
        checkpointer.close()

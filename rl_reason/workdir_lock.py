"""One run per workdir: process 0 holds a lock on `<workdir>/.rl_reason.lock` for the run's life.

Two runs on one workdir (a relaunch while the old one is still dying, a
launcher that exits without waiting for its children, two people typing the
same command) would interleave checkpoints, truncate each other's
`metrics.jsonl` and delete each other's `tensorboard/`. So a run's lead process
takes an exclusive `fcntl` lock before it touches anything in the workdir, and a
second start fails at once with `WorkdirLockedError` naming the holder (pid,
host, since when, its command).

- The lock is the kernel's (POSIX `lockf`), not the file's existence: a holder
  that dies in any way (SIGKILL, OOM killer, a crashed host on NFS once its
  lease expires) releases it, and no stale lock file ever needs deleting. The
  file is never removed (removing it would let a third process lock a new
  inode while a second still holds the old one); its contents only describe
  the latest holder.
- POSIX locks work across NFS clients (NFSv4 or NLM); over a gcsfuse mount or
  other object-store FUSE they are not shared between hosts and this guards
  only one machine.
- POSIX locks belong to a process, so a second `hold_workdir` of the same
  workdir in the same process does not conflict: it is counted, and the lock is
  released when the outermost one exits (the study's stages run in one process).
- With several processes, every process calls `hold_workdir`; process 0 takes
  the lock and all of them learn whether it got it, so that they all raise
  together instead of the others waiting for a lead that has stopped.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any, Optional

LOCK_NAME = ".rl_reason.lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock."""

    def __init__(self, message: str, holder: Optional[dict[str, Any]] = None):
        super().__init__(message)
        self.holder = holder or {}


_held: dict[str, list] = {}  # realpath -> [fd, count]
_guard = threading.Lock()


def lock_path(workdir: str) -> str:
    return os.path.join(workdir, LOCK_NAME)


def read_holder(workdir: str) -> dict[str, Any]:
    """What the latest holder wrote about itself ({} if nothing readable)."""
    try:
        with open(lock_path(workdir)) as f:
            holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(workdir: str, holder: dict[str, Any]) -> str:
    if not holder:
        return (
            f"{workdir} is in use by another run (its lock {lock_path(workdir)} is held, by a"
            " process that has not said who it is yet)."
        )
    command = " ".join(holder.get("argv") or [])
    return (
        f"{workdir} is in use by another run: pid {holder.get('pid', '?')} on host"
        f" {holder.get('host', '?')}, since {holder.get('since', '?')}"
        + (f" ({command})" if command else "")
        + ". Wait for it to end or stop it (a process that dies releases the lock by"
        " itself), or use another --workdir."
    )


def acquire(workdir: str) -> None:
    """Takes the workdir's lock for this process (counted; see `release`), or raises
    WorkdirLockedError naming the holder."""
    os.makedirs(workdir, exist_ok=True)
    key = os.path.realpath(workdir)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return
        fd = os.open(lock_path(workdir), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = read_holder(workdir)
            raise WorkdirLockedError(_describe(workdir, holder), holder) from None
        try:
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "argv": sys.argv,
            }
            data = (json.dumps(record) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing releases the lock
            raise
        _held[key] = [fd, 1]


def release(workdir: str) -> None:
    """Undoes one `acquire`; the last one releases the lock."""
    key = os.path.realpath(workdir)
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        os.close(entry[0])  # the kernel drops the lock with the last descriptor


def _lead_result(ok: bool, message: str) -> tuple[bool, str]:
    """Process 0's (ok, message), on every process (a no-op on one process)."""
    import jax

    if jax.process_count() == 1:
        return ok, message
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([1 if ok else 0], np.int32))
    return bool(np.asarray(flags).reshape(-1)[0]), message


@contextlib.contextmanager
def hold_workdir(workdir: str, *, lead: Optional[bool] = None) -> Iterator[None]:
    """Holds the workdir's lock while the block runs (the run's whole life).

    `lead` (default: `jax.process_index() == 0`) says whether this process takes
    it; every process of a multi-host run must call this (they agree on the
    outcome, so that all raise WorkdirLockedError together).
    """
    if lead is None:
        import jax

        lead = jax.process_index() == 0
    ok, message, error = True, "", None
    if lead:
        try:
            acquire(workdir)
        except WorkdirLockedError as e:
            ok, message, error = False, str(e), e
    agreed, _ = _lead_result(ok if lead else True, message)
    if error is not None:
        raise error
    if not agreed:
        if lead:  # `lead` was given to a process other than 0, and 0 failed
            release(workdir)
        raise WorkdirLockedError(
            f"{workdir} is in use by another run (process 0 could not take its lock; its"
            " log names the holder)."
        )
    try:
        yield
    finally:
        if lead:
            release(workdir)

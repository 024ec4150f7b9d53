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
- POSIX locks work across NFS clients (NFSv4 or NLM). A workdir on an object
  store is refused (`WorkdirStorageError`): a `gs://` URL (the run writes its
  metrics, config and tokenizer with local file calls) and a gcsfuse (or other
  object-store FUSE) mount, whose directory renames are not atomic (Orbax's
  commit and the tokenizer's save rely on them) and whose locks are not shared
  between hosts. Set RL_REASON_ALLOW_OBJECT_STORE_WORKDIR=1 to run there anyway.
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


class WorkdirStorageError(RuntimeError):
    """The workdir is on storage a run cannot rely on (an object store)."""


# FUSE file systems over object stores: no atomic directory rename, no shared locks.
OBJECT_STORE_FILESYSTEMS = (
    "fuse.gcsfuse", "fuse.s3fs", "fuse.goofys", "fuse.mountpoint-s3", "fuse.rclone",
    "fuse.blobfuse", "fuse.blobfuse2", "fuse.juicefs",
)
ALLOW_OBJECT_STORE_ENV = "RL_REASON_ALLOW_OBJECT_STORE_WORKDIR"


def _mount_of(path: str, mounts_file: str = "/proc/mounts") -> tuple[str, str]:
    """(mount point, file system type) of the mount holding `path` (Linux)."""
    path = os.path.realpath(path)
    best = ("/", "")
    try:
        with open(mounts_file) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best[0]):
                    best = (point, fields[2])
    except OSError:
        pass
    return best


def storage_problem(workdir: str, mounts_file: str = "/proc/mounts") -> Optional[str]:
    """Why a run cannot rely on `workdir`'s storage, or None."""
    if "://" in workdir:
        return (
            f"{workdir} is an object-store URL: rl_reason writes a run's metrics, config and"
            " tokenizer with local file calls and cannot lock it. Use a shared file system"
            " (NFS, Filestore) for the workdir."
        )
    probe = workdir
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    point, kind = _mount_of(probe, mounts_file)
    if kind in OBJECT_STORE_FILESYSTEMS:
        return (
            f"{workdir} is on a {kind} mount ({point}): it does not rename directories"
            " atomically (Orbax's checkpoint commit and the tokenizer's save rely on that) and"
            " its locks are not shared between hosts. Use a shared file system (NFS,"
            f" Filestore) for the workdir, or set {ALLOW_OBJECT_STORE_ENV}=1 to run anyway."
        )
    return None


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
    WorkdirLockedError naming the holder (WorkdirStorageError on an object store)."""
    problem = storage_problem(workdir)
    if problem and ("://" in workdir or os.environ.get(ALLOW_OBJECT_STORE_ENV) != "1"):
        raise WorkdirStorageError(problem)
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
        # The holder's record goes with the lock: a workdir left alone holds an empty
        # lock file (so that a finished run rerun changes no byte of it).
        try:
            os.ftruncate(entry[0], 0)
        except OSError:
            pass
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
        except (WorkdirLockedError, WorkdirStorageError) as e:
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

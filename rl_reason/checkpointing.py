"""Orbax checkpoints that never lose a run: verified, fallen back from, never NaN.

A checkpoint is one step directory holding any number of named pytree items
(a TrainState's params and its optimizer part apart, so that evaluation can
restore parameters alone; a critic; an ORM), the run's `progress` (JSON:
data cursor, algorithm phase, anything needed to continue exactly) and an
`integrity` record: every leaf's path, shape, dtype and checksum.

What a run can rely on:
- Nothing non-finite is ever written: `save` checks every floating leaf
  (where the arrays live, in the same jitted pass as the checksums) and
  raises `NonFiniteStateError` naming the leaf instead.
- Steps only rise: saving at or below the latest step is an error (Orbax
  would silently skip it).
- A checkpoint that does not decode or whose arrays do not match their
  checksums (format 2: every change confined to one element is seen) is moved aside to `<directory>_quarantine/` (never deleted), with
  a warning naming the step and the reason, and the next older intact one is
  restored. A read that fails because of the environment (permissions, a
  stale NFS handle, memory) raises `CheckpointEnvironmentError` and moves
  nothing; with several processes the verdict is agreed before anyone acts.
- A restore target whose shapes differ from the checkpoint's (a changed
  model) is a clear `IncompatibleCheckpointError` naming the leaves; the
  checkpoint is left alone, since it is intact.
- Saves are atomic (Orbax writes to a temporary directory and renames it);
  a kill mid-save leaves the previous checkpoint the latest.

`PreemptionGuard` turns SIGTERM/SIGINT (what a preempted TPU VM or SLURM
sends) and SIGHUP (a dropped ssh session) into a request the loop answers by saving and exiting after its
current step; across processes it uses JAX's preemption sync point, as
Orbax and MaxText do, so that every host saves the same step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_log = logging.getLogger(__name__)

PROGRESS, INTEGRITY = "progress", "integrity"
_RESERVED = (PROGRESS, INTEGRITY)
# Exit status of a run that saved and stopped on a preemption signal (EX_TEMPFAIL):
# not a failure, not finished; run the same command again.
PREEMPTED_EXIT_CODE = 75


class CheckpointError(Exception):
    """Base of the checkpointer's own errors."""


class NonFiniteStateError(CheckpointError, FloatingPointError):
    """A state about to be saved holds NaN or inf."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """The checkpoint is intact but does not fit what the run asks to restore."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint could not be decoded or does not match its checksums."""


class CheckpointEnvironmentError(CheckpointError):
    """A checkpoint could not be read because of the environment (a permission, a
    stale NFS handle, memory, an unreachable store), not because it is damaged:
    nothing was quarantined. The original error is the `__cause__`."""


# One process's verdict on one checkpoint, ordered by precedence when processes differ.
_OK, _DAMAGED, _INCOMPATIBLE, _ENVIRONMENT = 0, 1, 2, 3

# Errors of the environment rather than of the bytes read: errno values, and the
# status names TensorStore and XLA put in their messages.
_ENVIRONMENT_ERRNOS = {
    getattr(errno, name)
    for name in (
        "EACCES", "EPERM", "ESTALE", "EIO", "ENOMEM", "ENOSPC", "EMFILE", "ENFILE", "EAGAIN",
        "EBUSY", "ETIMEDOUT", "EHOSTDOWN", "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH",
        "ECONNREFUSED", "ECONNRESET", "ENOLCK", "EROFS", "EDQUOT", "EINTR", "ENOTCONN",
    )
    if hasattr(errno, name)
}
_ENVIRONMENT_MARKERS = (
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
    "UNAUTHENTICATED", "Permission denied", "Operation not permitted", "Stale file handle",
    "Cannot allocate memory", "Out of memory", "out of memory", "No space left on device",
    "Too many open files", "Input/output error", "Disk quota exceeded",
    "Read-only file system", "Connection refused", "Connection reset", "timed out",
)


def _is_environmental(error: BaseException) -> bool:
    """Whether `error` (or anything in its chain of causes) is the environment failing
    rather than the checkpoint's bytes: anything else that stops a read is damage."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (MemoryError, TimeoutError, ConnectionError, PermissionError)):
            return True
        if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
            return True
        text = str(error)
        if any(marker in text for marker in _ENVIRONMENT_MARKERS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _agree(verdict: int) -> list[int]:
    """Every process's verdict on one checkpoint, in process order, on every process
    (so that all act alike: one host's local error must not quarantine, or hang)."""
    if jax.process_count() == 1:
        return [verdict]
    from jax.experimental import multihost_utils

    every = multihost_utils.process_allgather(np.array([verdict], np.int32))
    return [int(v) for v in np.asarray(every).reshape(-1)]


class _Verdict(Exception):
    """A stage of a restore failed on at least one process: every process's verdict,
    this one's, and this one's error (None if it succeeded)."""

    def __init__(self, verdicts: list[int], verdict: int, error: Optional[BaseException]):
        super().__init__(str(error))
        self.verdicts, self.verdict, self.error = verdicts, verdict, error


def _stage(fn):
    """`fn()`'s value when it succeeded on every process; otherwise raises _Verdict on
    every process (after agreeing: no process goes on alone)."""
    error: Optional[BaseException] = None
    value = None
    try:
        value = fn()
        verdict = _OK
    except CorruptCheckpointError as e:
        error, verdict = e, _DAMAGED
        if isinstance(e.__cause__, BaseException) and _is_environmental(e.__cause__):
            verdict = _ENVIRONMENT
    except IncompatibleCheckpointError as e:
        error, verdict = e, _INCOMPATIBLE
    except Exception as e:  # noqa: BLE001 -- classified, agreed on, then re-raised
        error, verdict = e, (_ENVIRONMENT if _is_environmental(e) else _DAMAGED)
    verdicts = _agree(verdict)
    if max(verdicts) == _OK:
        return value
    raise _Verdict(verdicts, verdict, error)


def _as_uint32(x: jax.Array) -> jax.Array:
    """The array's bits as uint32, element-wise (narrower types zero-extended)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = x.dtype.itemsize
    if width == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if width == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if width == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    raise TypeError(f"No checksum for dtype {x.dtype}.")


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major flat index (uint32), built from iotas in the array's
    own shape, so that a sharded array is never reshaped."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride)
        stride *= shape[dim]
    return index


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 that mixes every bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _checksum_legacy(bits: jax.Array, index: jax.Array) -> jax.Array:
    """Format 1 (checkpoints written before issue 31): bits weighted by
    `index * 2654435761 + 1` and summed modulo 2**32. Its weight is even at every
    odd index, so it misses high-bit flips there; kept only to verify old checkpoints."""
    weights = index * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def _checksum_v2(bits: jax.Array, index: jax.Array) -> jax.Array:
    """Two 32-bit sums modulo 2**32, as one 64-bit value (high word, low word):

    - high: bits times an odd weight per position (`2 * index * 2654435761 + 1`).
      Multiplying by an odd number is a bijection modulo 2**32, so any change
      confined to one element (any set of bit flips in it) changes the sum.
    - low: `fmix32(bits ^ fmix32(index ^ seed))`, a bijection of the element's bits
      keyed by its position, so again any one-element change is seen, and changes
      to several elements cancel only by chance (about 2**-32), unlike in a linear sum.

    Both are sums of per-element terms (associative and commutative), so the value
    does not depend on how the array is sharded; both depend on positions, so a swap
    of two different elements changes them.
    """
    weights = (index * jnp.uint32(2654435761)) * jnp.uint32(2) + jnp.uint32(1)
    linear = jnp.sum(bits * weights, dtype=jnp.uint32)
    mixed = jnp.sum(_fmix32(bits ^ _fmix32(index ^ jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    return jnp.stack([linear, mixed])


# The algorithm new checkpoints record (integrity "checksum"); records without the
# field are format 1 and verify under LEGACY_CHECKSUM.
CHECKSUM_ALGORITHM = "oddsum32+fmix32/v2"
LEGACY_CHECKSUM = "weighted-sum32/v1"
_CHECKSUMS = {CHECKSUM_ALGORITHM: _checksum_v2, LEGACY_CHECKSUM: _checksum_legacy}


def _leaf_fingerprint(x: jax.Array, algorithm: str = CHECKSUM_ALGORITHM):
    """(checksum, all finite) of one array under `algorithm` (see `_checksum_v2`)."""
    bits = _as_uint32(x)
    checksum = _CHECKSUMS[algorithm](bits, _flat_index(x.shape))
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return checksum, jnp.asarray(finite)


_leaf_fingerprint_jit = jax.jit(_leaf_fingerprint, static_argnames="algorithm")


def _as_int(checksum: Any) -> int:
    """A checksum as the integer the integrity record holds (v2: high << 32 | low)."""
    words = np.asarray(checksum, np.uint64).reshape(-1)
    value = 0
    for word in words:
        value = (value << 32) | int(word)
    return value


def _fingerprints(
    leaves: list[jax.Array], algorithm: str = CHECKSUM_ALGORITHM
) -> tuple[list[Any], list[Any]]:
    """Every leaf's (checksum, finite), each computed where that leaf lives."""
    if algorithm not in _CHECKSUMS:
        raise CorruptCheckpointError(
            f"unknown checksum algorithm {algorithm!r} (this version knows {sorted(_CHECKSUMS)})"
        )
    pairs = jax.device_get([_leaf_fingerprint_jit(x, algorithm=algorithm) for x in leaves])
    return [_as_int(c) for c, _ in pairs], [f for _, f in pairs]


def _paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def describe(
    tree: Any, with_checksums: bool = True, *, algorithm: str = CHECKSUM_ALGORITHM
) -> dict[str, Any]:
    """The integrity record of one item: leaf paths, shapes, dtypes (and checksums,
    under `algorithm`: the current one unless verifying an older checkpoint).

    With checksums, also raises NonFiniteStateError if a floating leaf is not finite.
    """
    leaves = jax.tree.leaves(tree)
    record = {
        "paths": _paths(tree),
        "shapes": [list(x.shape) for x in leaves],
        "dtypes": [str(x.dtype) for x in leaves],
    }
    if with_checksums:
        sums, finite = _fingerprints(leaves, algorithm)
        bad = [p for p, ok in zip(record["paths"], finite) if not ok]
        if bad:
            raise NonFiniteStateError(
                f"{len(bad)} array(s) hold NaN or inf, e.g. {', '.join(bad[:3])}; not saved."
            )
        record["checksums"] = [int(s) for s in sums]
    return record


class Checkpointer:
    """Keep-N, interval-saving, asynchronous, verified checkpoints of one run."""

    def __init__(
        self,
        directory: str,
        *,
        save_interval_steps: int = 100,
        max_to_keep: int = 3,
        async_save: bool = True,
    ):
        if "://" in str(directory):
            # abspath would turn gs://b/x into ./gs:/b/x and write there, locally.
            raise CheckpointError(
                f"{directory}: object-store URLs are not supported as checkpoint directories"
                " (the quarantine and the run's other files use local file calls); use a"
                " shared file system (NFS, Filestore)."
            )
        self.directory = os.path.abspath(directory)
        self.quarantine_directory = self.directory.rstrip("/") + "_quarantine"
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, save_interval_steps),
            max_to_keep=max_to_keep if max_to_keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def quarantined(self) -> list[str]:
        """The damaged checkpoints moved aside so far (their directory names)."""
        if not os.path.isdir(self.quarantine_directory):
            return []
        return sorted(n for n in os.listdir(self.quarantine_directory) if not n.endswith(".txt"))

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def save(
        self,
        step: int,
        items: Mapping[str, Any],
        progress: Mapping[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Saves the pytrees `items` and `progress` when `step` is on the interval (or
        `force`); returns whether it did. Raises NonFiniteStateError before writing
        anything if a floating leaf is NaN or inf."""
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"Checkpoint step {step} is not above the latest saved step {latest} in"
                f" {self.directory}: steps must only rise (Orbax would silently skip it)."
            )
        if not (force or self._manager.should_save(step)):
            return False
        reserved = set(items) & set(_RESERVED)
        if reserved:
            raise ValueError(f"Item names {sorted(reserved)} are reserved.")
        integrity = {"format": 2, "checksum": CHECKSUM_ALGORITHM, "items": {}}
        for name, tree in items.items():
            try:
                integrity["items"][name] = describe(tree)
            except NonFiniteStateError as e:
                raise NonFiniteStateError(f"Step {step}, item {name!r}: {e}") from None
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        args[PROGRESS] = ocp.args.JsonSave(dict(progress))
        args[INTEGRITY] = ocp.args.JsonSave(integrity)
        return self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def read_integrity(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{INTEGRITY: ocp.args.JsonRestore()})
        )
        return dict(restored[INTEGRITY])

    def restore(
        self, abstract_items: Mapping[str, Any], step: Optional[int] = None
    ) -> tuple[dict[str, Any], dict[str, Any], int]:
        """(items, progress, step) from the newest intact checkpoint (or `step`).

        `abstract_items` maps item names to pytrees of jax.ShapeDtypeStruct with
        `.sharding` set (the restore target, e.g. `abstract_train_state`); it may
        name a subset of the saved items. A checkpoint that does not decode or
        verify is quarantined and the next older one tried (not when `step` is
        given: then the error is raised). A read that fails because of the
        environment (permissions, a stale NFS handle, memory, an unreachable
        store) is not damage: `CheckpointEnvironmentError` is raised with its
        cause and nothing is moved. With several processes, they agree on each
        checkpoint's verdict before any acts on it: if any process met an
        environment error every process raises it; if any found damage every
        process quarantines it.
        """
        candidates = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not candidates:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        for candidate in candidates:
            try:
                items, progress = self._restore_verified(abstract_items, candidate)
            except _Verdict as outcome:
                verdicts, verdict, error = outcome.verdicts, outcome.verdict, outcome.error
                agreed = max(verdicts)
                others = lambda kind: [p for p, v in enumerate(verdicts) if v == kind]  # noqa: E731
                if agreed == _ENVIRONMENT:
                    if verdict == _ENVIRONMENT:
                        cause = error.__cause__ if isinstance(error, CorruptCheckpointError) else error
                        raise CheckpointEnvironmentError(
                            f"Checkpoint {candidate} in {self.directory} could not be read because"
                            f" of the environment, not damage ({_short(cause)}). Nothing was moved"
                            " aside; fix the cause (permissions, mounts, memory) and run again."
                        ) from cause
                    raise CheckpointEnvironmentError(
                        f"Checkpoint {candidate} in {self.directory}: process(es)"
                        f" {others(_ENVIRONMENT)} could not read it because of their environment"
                        " (see their logs). Nothing was moved aside."
                    )
                if agreed == _INCOMPATIBLE:
                    if verdict == _INCOMPATIBLE:
                        raise error
                    raise IncompatibleCheckpointError(
                        f"Checkpoint {candidate} in {self.directory} does not fit this run on"
                        f" process(es) {others(_INCOMPATIBLE)}."
                    )
                reason = (
                    str(error)
                    if verdict == _DAMAGED
                    else f"damaged as read by process(es) {others(_DAMAGED)}"
                )
                if step is not None:
                    if isinstance(error, CorruptCheckpointError):
                        raise error
                    raise CorruptCheckpointError(f"Checkpoint {candidate}: {reason}")
                self.quarantine(candidate, reason)
                continue
            _log.info("Restored checkpoint %d from %s", candidate, self.directory)
            return items, progress, candidate
        raise CorruptCheckpointError(
            f"No intact checkpoint left in {self.directory}; the damaged ones are in"
            f" {self.quarantine_directory}."
        )

    def _read(self, step: int, args: Mapping[str, Any]) -> Any:
        """Orbax's restore of the items `args` of checkpoint `step`.

        On several processes, through Orbax's handler directly: the manager's
        restore ends in a barrier that a process whose read failed never reaches
        (the others would wait there for ever); here every stage of a restore ends
        in `_stage`'s agreement instead, which every process reaches."""
        if jax.process_count() == 1:
            return self._manager.restore(step, args=ocp.args.Composite(**args))
        handler = ocp.CompositeCheckpointHandler()
        try:
            return handler.restore(
                epath.Path(self.directory) / str(step), args=ocp.args.Composite(**args)
            )
        finally:
            handler.close()

    def _restore_verified(self, abstract_items, step):
        """Reads and verifies checkpoint `step` in stages; each stage ends with every
        process's verdict agreed (`_stage`), so that no process goes on to a stage
        (and its collectives) that another has left."""

        def read_integrity():
            try:
                with _orbax_errors_quiet():
                    record = dict(self._read(step, {INTEGRITY: ocp.args.JsonRestore()})[INTEGRITY])
                saved = record["items"]
            except Exception as e:  # noqa: BLE001 -- classified from the cause
                raise CorruptCheckpointError(
                    f"its integrity record does not read ({_short(e)})"
                ) from e
            algorithm = record.get("checksum", LEGACY_CHECKSUM)
            if algorithm not in _CHECKSUMS:
                raise CorruptCheckpointError(
                    f"its integrity record names an unknown checksum algorithm {algorithm!r}"
                )
            for name, abstract in abstract_items.items():
                if name not in saved:
                    raise IncompatibleCheckpointError(
                        f"Checkpoint {step} in {self.directory} has no item {name!r}"
                        f" (it has {sorted(saved)})."
                    )
                wanted = describe(abstract, with_checksums=False)
                _check_compatible(name, saved[name], wanted, step)
            return saved, algorithm

        saved, algorithm = _stage(read_integrity)

        def read_arrays():
            args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
            args[PROGRESS] = ocp.args.JsonRestore()
            _drop_echoes_of_a_failed_read()  # before: the first echo can beat the error here
            try:
                with _orbax_errors_quiet():
                    return self._read(step, args)
            except Exception as e:  # noqa: BLE001 -- TensorStore/zstd/missing files: damage
                raise CorruptCheckpointError(f"its arrays do not read ({_short(e)})") from e

        restored = _stage(read_arrays)
        items = {name: restored[name] for name in abstract_items}

        def verify():
            for name, tree in items.items():
                try:
                    sums = describe(tree, algorithm=algorithm)["checksums"]
                except NonFiniteStateError as e:
                    raise CorruptCheckpointError(f"item {name!r} reads back with NaN or inf: {e}")
                bad = [
                    p
                    for p, a, b in zip(saved[name]["paths"], sums, saved[name]["checksums"])
                    if a != b
                ]
                if bad:
                    raise CorruptCheckpointError(
                        f"item {name!r}: {len(bad)} array(s) do not match their checksums,"
                        f" e.g. {', '.join(bad[:3])}"
                    )

        _stage(verify)
        return items, dict(restored[PROGRESS])

    def read_progress(self, step: Optional[int] = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{PROGRESS: ocp.args.JsonRestore()})
        )
        return dict(restored[PROGRESS])

    def quarantine(self, step: int, reason: str) -> str:
        """Moves checkpoint `step` aside (never deletes it); returns where it went."""
        self.wait()
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.quarantine_directory, f"{step}.{time.time_ns()}")
        _log.warning(
            "Checkpoint %d in %s is damaged: %s. Moved to %s; trying the previous one.",
            step,
            self.directory,
            reason,
            target,
        )
        if jax.process_index() == 0 and os.path.exists(source):
            os.makedirs(self.quarantine_directory, exist_ok=True)
            shutil.move(source, target)
            with open(target + ".reason.txt", "w") as f:
                f.write(reason + "\n")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"rl_reason_quarantine_{step}")
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


@contextlib.contextmanager
def _orbax_errors_quiet():
    """Orbax logs a failed read's whole TensorStore spec (hundreds of lines) before
    raising; the error is reported in one line by the caller instead."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _drop_echoes_of_a_failed_read() -> None:
    """Silences the echoes of a failed read.

    When one array of a restore fails, Orbax's asyncio loop closes with the error
    while TensorStore is still reading the others. As each of those reads ends,
    TensorStore's thread hands it to the closed loop ("RuntimeError: Event loop is
    closed"), and each abandoned Orbax read coroutine raises again when it is
    garbage collected; Python reports every one as an unraisable exception with a
    traceback (dozens of lines after the one-line warning, at random moments).
    Those, and only those, are dropped; every other unraisable exception still
    reaches the previous hook. An abandoned read that had failed too is reported
    differently, through asyncio's logger ("Task exception was never retrieved",
    with its traceback): a filter drops that report when the failure was raised in
    Orbax's code, and lets every other one through.
    """
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropOrbaxUnretrievedTasks) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropOrbaxUnretrievedTasks())
    previous = sys.unraisablehook
    if getattr(previous, "_drops_echoes_of_a_failed_read", False):
        return

    def is_echo(unraisable) -> bool:
        error, tb, source = unraisable.exc_value, unraisable.exc_traceback, unraisable.object
        names = []
        while tb is not None:
            names.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return "call_soon_threadsafe" in names
        code = getattr(source, "cr_code", None)  # a coroutine finalized unfinished
        return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename

    def hook(unraisable):
        if not is_echo(unraisable):
            previous(unraisable)

    hook._drops_echoes_of_a_failed_read = True
    sys.unraisablehook = hook


class _DropOrbaxUnretrievedTasks(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" report of a task whose
    error was raised in Orbax's code (see `_drop_echoes_of_a_failed_read`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in str(record.msg) or not record.exc_info:
            return True
        tb = record.exc_info[2]
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


def _short(error: BaseException, limit: int = 300) -> str:
    """An exception as one short line (TensorStore's run to hundreds of lines): its
    root cause, which names the array and the file (Orbax's wrapper names only an
    index range), without the TensorStore spec appended to it."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(f"{type(error).__name__}: {error}".split()).split(" [tensorstore_spec")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_compatible(name: str, saved: dict, wanted: dict, step: int) -> None:
    """Raises IncompatibleCheckpointError naming the leaves whose layout differs."""
    saved_layout = {p: (s, d) for p, s, d in zip(saved["paths"], saved["shapes"], saved["dtypes"])}
    wanted_layout = {
        p: (s, d) for p, s, d in zip(wanted["paths"], wanted["shapes"], wanted["dtypes"])
    }
    problems = []
    for path in sorted(set(saved_layout) | set(wanted_layout)):
        a, b = saved_layout.get(path), wanted_layout.get(path)
        if a is None:
            problems.append(f"{path}: not in the checkpoint")
        elif b is None:
            problems.append(f"{path}: in the checkpoint but not in the run")
        elif a != b:
            problems.append(f"{path}: checkpoint {a[1]}{a[0]}, run {b[1]}{b[0]}")
    if problems:
        shown = "\n  ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise IncompatibleCheckpointError(
            f"Checkpoint {step} item {name!r} does not fit this run's model:\n  {shown}{more}"
        )


def train_state_items(name: str, state: Any) -> dict[str, Any]:
    """A TrainState as two items, `<name>.params` and `<name>.train` (step, optimizer,
    rng), so that evaluation restores the parameters alone."""
    return {f"{name}.params": state.params, f"{name}.train": state.replace(params=None)}


def merge_train_state(name: str, items: Mapping[str, Any]) -> Any:
    """Inverse of `train_state_items`."""
    return items[f"{name}.train"].replace(params=items[f"{name}.params"])


class PreemptionGuard:
    """Answers "should the run save and stop now?" after each step.

    One process: SIGTERM, SIGINT or SIGHUP (a dropped ssh session, a closed
    terminal) sets a flag (the signal no longer kills the process mid-step).
    Several: JAX's preemption sync point, which agrees on one step for every
    host; it listens for SIGTERM, so SIGHUP is turned into a SIGTERM to this
    process. Use as a context manager; handlers are restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    # A signal a process took before its run's guard was set up (a study worker's handler
    # notes it here), which that guard acts on as if it had come after.
    early_signal: Optional[int] = None

    def __init__(self):
        self.signal_received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    @staticmethod
    def note_early_signal(signum, frame) -> None:
        del frame
        PreemptionGuard.early_signal = signum

    def __enter__(self) -> "PreemptionGuard":
        if jax.process_count() == 1:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._hangup_as_term)
        if self.signal_received is None:  # read after the handlers are in: none is lost
            self.signal_received = PreemptionGuard.early_signal
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signal_received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_received = signum
        _log.warning("Received %s: saving after the current step.", signal.Signals(signum).name)

    def _hangup_as_term(self, signum, frame) -> None:
        del frame
        self.signal_received = signum
        _log.warning("Received SIGHUP: passing it on as SIGTERM (save at the agreed step).")
        os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signal_received is not None


class Preempted(Exception):
    """Raised by a loop that saved and stopped on a preemption signal."""

    def __init__(self, step: int, workdir: str):
        super().__init__(
            f"Preempted: saved step {step} and stopped. Run the same command with"
            f" --workdir={workdir} to resume."
        )
        self.step = step


def write_json_atomic(path: str, value: Any) -> None:
    """JSON written to a temporary file, synced, then renamed over `path`."""
    write_bytes_atomic(path, (json.dumps(value, indent=2, default=_json_default) + "\n").encode())


def write_bytes_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")

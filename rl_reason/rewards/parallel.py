"""Run a pure function over chunks of a batch in kept Python subprocesses.

Scoring a round of completions (100,000 for Expert Iteration on GSM8K at
K=16) is extraction and judging in plain Python, one core's work unless it
is split. ``multiprocessing`` would fork after JAX's threads (unsafe) or, with
"spawn", re-import the caller's main module (which breaks scripts without a
``__main__`` guard). So, as for the LaTeX workers, the processes here are
plain ``python -c`` subprocesses importing only this package, started on
first use and kept; requests and results cross their pipes as JSON (no
pickle: nothing read from a pipe can run code). Only module-level functions
of ``rl_reason`` run there, on data this process sends.

What a caller can rely on:
- Every request carries an id and its reply must carry the same one: a reply
  that does not (a worker out of step) is never taken for another chunk's.
- Every chunk has a deadline (``timeout`` seconds from when it is sent); a
  worker that misses it is killed and replaced, with a warning, and its chunk
  is tried once more on a fresh worker. A chunk that overruns or kills its
  worker twice raises ``RewardWorkerError``: it is never run in this process,
  where a hang or a runaway allocation would take the training run with it.
- A worker that died between calls (killed, OOM) is replaced, with a warning.
- Workers run under ``RLIMIT_AS`` (``memory_limit_bytes``), no core dumps, and
  a lower scheduling priority; their CPU time is bounded by the deadline.
- A chunk whose function raises an ordinary exception in the worker is rerun
  here so that the exception and its traceback surface as they would without
  workers (a MemoryError is a RewardWorkerError instead).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

_log = logging.getLogger(__name__)

_HEADER = struct.Struct("<Q")
DEFAULT_TIMEOUT = 300.0  # seconds for one chunk (extraction of 50,000 answers takes ~5 s)
DEFAULT_MEMORY_LIMIT = 4 << 30  # bytes of address space per worker
_NICENESS = 5


class RewardWorkerError(RuntimeError):
    """A chunk overran its deadline or killed its worker twice, or ran out of memory."""


def _write(stream, obj: Any) -> None:
    """A length-prefixed JSON message (tuples arrive as lists; the functions take either)."""
    data = json.dumps(obj).encode("utf-8")
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read(stream) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the process closed its pipe")
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the process closed its pipe")
    return json.loads(data)


class _Reader:
    """Non-blocking reads of length-prefixed messages from one worker's stdout."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buffer = b""

    def poll(self) -> Optional[Any]:
        """A complete message if one is buffered now (after reading what is readable)."""
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            raise EOFError("the process closed its pipe")
        self.buffer += chunk
        return self.take()

    def take(self) -> Optional[Any]:
        if len(self.buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack(self.buffer[: _HEADER.size])
        if len(self.buffer) < _HEADER.size + size:
            return None
        data = self.buffer[_HEADER.size : _HEADER.size + size]
        self.buffer = self.buffer[_HEADER.size + size :]
        return json.loads(data)


class ProcessMap:
    """``processes`` kept subprocesses; :meth:`map` runs a function on one chunk in each."""

    def __init__(
        self,
        processes: int,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
    ):
        self.processes = processes
        self.timeout = timeout
        self.memory_limit_bytes = memory_limit_bytes
        self.replaced = 0  # workers replaced after dying or overrunning (for logs and tests)
        self._procs: list[subprocess.Popen] = []
        self._readers: dict[int, _Reader] = {}
        self._next_id = 0
        self._lock = threading.Lock()

    def _spawn(self) -> subprocess.Popen:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        boot = (
            f"import sys; sys.path.insert(0, {root!r}); "
            f"from rl_reason.rewards.parallel import _serve; _serve({self.memory_limit_bytes})"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", boot],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._readers[proc.pid] = _Reader(proc)
        return proc

    def _start(self) -> None:
        for proc in [p for p in self._procs if p.poll() is not None]:
            _log.warning(
                "Reward worker %d had died (exit status %s); replacing it.", proc.pid, proc.returncode
            )
            self._discard(proc)
            self.replaced += 1
        while len(self._procs) < self.processes:
            self._procs.append(self._spawn())

    def _discard(self, proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self._readers.pop(proc.pid, None)
        if proc in self._procs:
            self._procs.remove(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self) -> None:
        with self._lock:
            for proc in list(self._procs):
                self._discard(proc)
            self._procs = []

    def map(self, function: Callable, chunks: Sequence[tuple]) -> list[Any]:
        """``[function(*args) for args in chunks]``, up to one chunk per process at once."""
        if not function.__module__.startswith("rl_reason."):
            raise ValueError("only rl_reason's own module-level functions run in the processes")
        name = (function.__module__, function.__qualname__)
        results: list[Any] = [None] * len(chunks)
        with self._lock:
            queue = list(range(len(chunks)))
            failures = {i: 0 for i in queue}
            while queue:
                self._start()
                batch, queue = queue[: self.processes], queue[self.processes :]
                retry = self._run_batch(function, name, chunks, batch, results, failures)
                queue = retry + queue
        return results

    def _run_batch(self, function, name, chunks, batch, results, failures) -> list[int]:
        """Sends one chunk to each worker and collects the replies by their ids; returns
        the chunks to try again (on fresh workers)."""
        sent: dict[int, tuple[subprocess.Popen, int, float]] = {}  # request id -> ...
        retry: list[int] = []
        for proc, i in zip(list(self._procs), batch):
            request_id, self._next_id = self._next_id, self._next_id + 1
            try:
                _write(proc.stdin, (request_id, name, chunks[i]))
            except OSError:
                self._lost(proc, i, failures, retry, "died before taking its chunk")
                continue
            sent[request_id] = (proc, i, time.monotonic() + self.timeout)
        try:
            self._collect(function, name, chunks, sent, results, failures, retry)
        except BaseException:
            for proc, _, _ in sent.values():  # their replies would come out of step later
                self._discard(proc)
            raise
        return retry

    def _collect(self, function, name, chunks, sent, results, failures, retry) -> None:
        while sent:
            waiting = {self._readers[p.pid].fd: (rid, p) for rid, (p, _, _) in sent.items()}
            wait = max(0.0, min(end for _, _, end in sent.values()) - time.monotonic())
            readable, _, _ = select.select(list(waiting), [], [], wait)
            for fd in readable:
                request_id, proc = waiting[fd]
                _, i, _ = sent[request_id]
                try:
                    reply = self._readers[proc.pid].poll()
                except (EOFError, OSError, ValueError):
                    del sent[request_id]
                    self._lost(proc, i, failures, retry, "died on its chunk")
                    continue
                if reply is None:
                    continue  # a partial message: more to read
                del sent[request_id]
                if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == request_id):
                    self._lost(proc, i, failures, retry, f"answered out of step ({str(reply)[:80]})")
                    continue
                _, ok, value = reply
                if ok:
                    results[i] = value
                elif value == "MemoryError":
                    self._discard(proc)
                    raise RewardWorkerError(
                        f"{name[0]}.{name[1]} ran out of memory in a reward worker (limit"
                        f" {self.memory_limit_bytes >> 20} MiB) on chunk {i}."
                    )
                else:  # raised: rerun here so the exception surfaces as it would without workers
                    results[i] = function(*chunks[i])
            now = time.monotonic()
            for request_id, (proc, i, end) in list(sent.items()):
                if now >= end:
                    del sent[request_id]
                    self._lost(
                        proc, i, failures, retry, f"did not answer within {self.timeout:g} s"
                    )

    def _lost(self, proc, i, failures, retry, what: str) -> None:
        """A worker that failed its chunk: killed, replaced on the next start, logged; the
        chunk is tried again once, then it is an error."""
        _log.warning("Reward worker %d %s (chunk %d); replacing it.", proc.pid, what, i)
        self._discard(proc)
        self.replaced += 1
        failures[i] += 1
        if failures[i] >= 2:
            raise RewardWorkerError(
                f"Chunk {i} failed in two reward workers (the last {what}); it is not run in"
                " this process, where it could hang or exhaust the run."
            )
        retry.append(i)


@functools.cache
def process_map(processes: int) -> ProcessMap:
    """One kept :class:`ProcessMap` per size, per process."""
    return ProcessMap(processes)


def limit_worker(memory_limit_bytes: int) -> None:
    """What a reward worker applies to itself first: an address-space limit, no core
    dumps, and a lower priority than the training process."""
    import resource

    if memory_limit_bytes > 0:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory_limit_bytes if hard == resource.RLIM_INFINITY else min(hard, memory_limit_bytes)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        os.nice(_NICENESS)
    except OSError:
        pass


def _serve(memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT) -> None:
    """Process loop: (id, (module, function name), args) in, (id, ok, result) out, as JSON."""
    limit_worker(memory_limit_bytes)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr
    while True:
        try:
            request_id, (module, qualname), args = _read(stdin)
        except EOFError:
            return
        try:
            function = getattr(importlib.import_module(module), qualname)
            _write(stdout, (request_id, True, function(*args)))
        except MemoryError:
            _write(stdout, (request_id, False, "MemoryError"))
        except Exception as e:  # noqa: BLE001 -- the caller reruns the chunk itself
            _write(stdout, (request_id, False, type(e).__name__))


def _probe(seconds: float = 0.0, exit_code: Optional[int] = None, allocate: int = 0) -> int:
    """For tests and health checks of the workers: sleeps, exits or allocates, then
    answers with its pid."""
    if seconds:
        time.sleep(seconds)
    if exit_code is not None:
        os._exit(exit_code)
    if allocate:
        block = bytearray(allocate)
        del block
    return os.getpid()

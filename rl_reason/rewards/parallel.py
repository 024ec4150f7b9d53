"""Run a pure function over chunks of a batch in kept Python subprocesses.

Scoring a round of completions (100,000 for Expert Iteration on GSM8K at
K=16) is extraction and judging in plain Python, one core's work unless it
is split. ``multiprocessing`` would fork after JAX's threads (unsafe) or, with
"spawn", re-import the caller's main module (which breaks scripts without a
``__main__`` guard). So, as for the LaTeX workers, the processes here are
plain ``python -c`` subprocesses importing only this package, started on
first use and kept; requests and results cross their pipes as JSON (no
pickle: nothing read from a pipe can run code). Only
module-level functions of ``rl_reason`` run there, on data this process
sends; a process that dies makes its chunk run here instead.
"""

from __future__ import annotations

import functools
import importlib
import os
import json
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

_HEADER = struct.Struct("<Q")


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


class ProcessMap:
    """``processes`` kept subprocesses; :meth:`map` runs a function on one chunk in each."""

    def __init__(self, processes: int):
        self.processes = processes
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def _start(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        boot = (
            f"import sys; sys.path.insert(0, {root!r}); "
            "from rl_reason.rewards.parallel import _serve; _serve()"
        )
        while len(self._procs) < self.processes:
            self._procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", boot],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
            )

    def close(self) -> None:
        with self._lock:
            for proc in self._procs:
                proc.kill()
                proc.wait()
            self._procs = []

    def map(self, function: Callable, chunks: Sequence[tuple]) -> list[Any]:
        """``[function(*args) for args in chunks]``, up to one chunk per process at once."""
        if not function.__module__.startswith("rl_reason."):
            raise ValueError("only rl_reason's own module-level functions run in the processes")
        name = (function.__module__, function.__qualname__)
        results: list[Any] = [None] * len(chunks)
        with self._lock:
            for start in range(0, len(chunks), self.processes):
                self._start()
                batch = list(enumerate(chunks))[start : start + self.processes]
                sent = []
                for proc, (i, args) in zip(self._procs, batch):
                    try:
                        _write(proc.stdin, (name, args))
                        sent.append((proc, i))
                    except OSError:
                        results[i] = function(*args)
                for proc, i in sent:
                    try:
                        ok, value = _read(proc.stdout)
                    except (EOFError, OSError, ValueError):
                        ok, value = False, None
                    if not ok:  # died or raised: this chunk runs here (and raises here, if it does)
                        proc.kill()
                        proc.wait()
                        self._procs.remove(proc)
                        value = function(*chunks[i])
                    results[i] = value
        return results


@functools.cache
def process_map(processes: int) -> ProcessMap:
    """One kept :class:`ProcessMap` per size, per process."""
    return ProcessMap(processes)


def _serve() -> None:
    """Process loop: (module, function name, args) in, (ok, result) out, as JSON."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr
    while True:
        try:
            (module, qualname), args = _read(stdin)
        except EOFError:
            return
        try:
            function = getattr(importlib.import_module(module), qualname)
            _write(stdout, (True, function(*args)))
        except Exception:  # noqa: BLE001 -- the caller reruns the chunk itself
            _write(stdout, (False, None))

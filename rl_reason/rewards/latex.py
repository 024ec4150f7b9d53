"""Symbolic equivalence of LaTeX answers through math-verify, under a time limit.

math-verify (sympy underneath) can run for minutes or forever on hostile
input, and its own timeouts rely on SIGALRM, which only works in a main
thread. So, as MaxText does for its math rewards, the check runs in a
separate worker process: each comparison gets a deadline, and a worker that
overruns it is killed (the answer counts as not equivalent) and replaced on
the next call. The worker is a plain ``python -m`` subprocess speaking JSON
lines, so it is independent of how the parent started (fork after JAX's
threads is unsafe) and costs nothing until the first LaTeX answer.

Run as a module, this file is that worker.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from typing import Self

MAX_ANSWER_CHARS = 1000  # a longer "answer" is not equivalent to anything


def _as_math(text: str) -> str:
    return text if "$" in text or "\\[" in text or "\\(" in text else f"${text}$"


class LatexChecker:
    """Decides whether two LaTeX answers are equal, each call within ``timeout`` seconds.

    Start-up (importing sympy in the worker) has its own, longer limit. Use as
    a context manager or call :meth:`close`; the worker also exits with its
    parent, whose pipe it reads. One checker serves one thread at a time.
    """

    def __init__(self, timeout: float = 2.0, startup_timeout: float = 60.0):
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._buffer = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kills the worker, if any; the next call starts a new one."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
            self._buffer = b""

    def _start(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rl_reason.rewards.latex"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        if self._read_line(self.startup_timeout) is None:
            self.close()
            raise RuntimeError("the math-verify worker did not start")

    def _read_line(self, timeout: float) -> bytes | None:
        """One line from the worker, or None if it does not arrive in time."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def equivalent(self, gold: str, predicted: str) -> bool:
        """True when math-verify proves ``predicted`` equal to ``gold`` in time; never raises for any strings."""
        if len(gold) > MAX_ANSWER_CHARS or len(predicted) > MAX_ANSWER_CHARS:
            return False
        if self._proc is None:
            self._start()
        request = json.dumps({"gold": _as_math(gold), "predicted": _as_math(predicted)})
        try:
            self._proc.stdin.write(request.encode() + b"\n")
            self._proc.stdin.flush()
        except OSError:
            self.close()
            return False
        line = self._read_line(self.timeout)
        if line is None:
            self.close()
            return False
        return json.loads(line) is True


def _serve() -> None:
    """Worker loop: one JSON request per line in, ``true``/``false`` per line out."""
    import logging

    from math_verify import parse, verify

    logging.disable(logging.WARNING)  # math-verify warns that we disabled its timeouts
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    out.write(b"null\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            gold = parse(request["gold"], parsing_timeout=None)
            predicted = parse(request["predicted"], parsing_timeout=None)
            result = bool(gold and predicted and verify(gold, predicted, timeout_seconds=None))
        except Exception:  # noqa: BLE001 -- any failure on untrusted input means "not equivalent"
            result = False
        out.write(b"true\n" if result else b"false\n")
        out.flush()


if __name__ == "__main__":
    _serve()

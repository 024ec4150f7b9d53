"""Symbolic equivalence of LaTeX answers through math-verify, in a pool of time-limited workers.

math-verify (sympy underneath) can run for minutes or forever on hostile
input, and its own timeouts rely on SIGALRM, which only works in a main
thread. So, as MaxText does for its math rewards, checks run in separate
worker processes: each comparison gets a deadline, and a worker that
overruns it is killed (the answer counts as not equivalent) and a
replacement is started at once, in the background, so the next check finds
a ready worker instead of paying the restart. Workers are plain ``python``
subprocesses (this module's ``_serve``) speaking JSON lines (each reply carries
its request's id, and a worker out of step is replaced), under an address-space
limit (``WORKER_MEMORY_LIMIT``) and a lower priority; a worker that dies is
logged and replaced, so they are
independent of how the parent started (fork after JAX's threads is unsafe)
and cost nothing until the first LaTeX answer. :meth:`LatexChecker.equivalent_many` keeps every worker
busy, so a batch's checks run on all cores and one slow check does not
serialise the rest.

The worker compares numbers by this project's rule (see :func:`_compare`):
two exact values (rationals, radicals, pi, ...) are equal only if sympy
proves their difference zero; a tolerance (``rel_tol``) applies only when
one side holds a decimal, that is, may be a rounding. Everything else
(expressions, equations, sets, intervals, matrices) is math-verify's
``verify``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Self

from rl_reason.rewards.numbers import DEFAULT_REL_TOL

_log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000  # a longer "answer" is not equivalent to anything
DEFAULT_TIMEOUT = 1.0  # seconds per check (config: rewards.latex_timeout)
DEFAULT_WORKERS = max(1, min(2, os.cpu_count() or 1))  # config: rewards.latex_workers
# Idle, warm workers beyond ``workers``: after an overrun kills a worker, a spare
# takes over at once while the replacement starts (1.5-2 s on a loaded machine).
DEFAULT_SPARES = 1
MAX_REMEMBERED = 65536  # answered pairs kept (about 15 MB)
WORKER_MEMORY_LIMIT = 4 << 30  # bytes of address space per worker (RLIMIT_AS)
# What `equivalent` allows beyond `timeout` for handing the check to a ready
# worker: a call bounded by `timeout` alone would cut every check that much short.
DISPATCH_ALLOWANCE = 0.1  # seconds


def _as_math(text: str) -> str:
    return text if "$" in text or "\\[" in text or "\\(" in text else f"${text}$"


@dataclasses.dataclass
class CheckerStats:
    """Counters since the checker was made; subtract two snapshots for one batch."""

    checks: int = 0  # comparisons answered by a worker (in time or not)
    cached: int = 0  # comparisons answered from the checker's memory of earlier ones
    timeouts: int = 0  # comparisons that overran and killed their worker
    restarts: int = 0  # workers started after the first ones
    seconds: float = 0.0  # wall time spent inside equivalent / equivalent_many
    slowest: float = 0.0  # the longest single comparison, in seconds
    most_at_once: int = 0  # the most comparisons checked at the same time
    waits_for_a_start: int = 0  # waits of queued comparisons for a worker still starting

    def minus(self, earlier: CheckerStats) -> CheckerStats:
        return CheckerStats(
            self.checks - earlier.checks,
            self.cached - earlier.cached,
            self.timeouts - earlier.timeouts,
            self.restarts - earlier.restarts,
            self.seconds - earlier.seconds,
            self.slowest,
            self.most_at_once,
            self.waits_for_a_start - earlier.waits_for_a_start,
        )


class _Worker:
    """One worker process and what it is doing: starting, idle, or checking one request."""

    def __init__(self):
        # This file's own package comes first on the worker's path (not whatever
        # rl_reason the working directory holds, as ``python -m`` would import).
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        boot = (
            f"import sys; sys.path.insert(0, {package_root!r}); "
            "from rl_reason.rewards.latex import _serve; _serve()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.fd = self.proc.stdout.fileno()
        self.started = time.monotonic()
        self.ready = False
        self.buffer = b""
        self.job: int | None = None  # index of the request being checked
        self.request_id = 0  # the id the request carried; its reply must carry it back
        self.key: tuple = ()  # its (gold, predicted, rel_tol)
        self.sent = 0.0  # when that request was sent

    def read_lines(self) -> list[bytes] | None:
        """Complete lines now readable (None: the worker closed its end)."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return lines

    def send(self, job: int, request: dict) -> bool:
        self.request_id += 1
        line = json.dumps({**request, "id": self.request_id}).encode() + b"\n"
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except OSError:
            return False
        self.job, self.sent = job, time.monotonic()
        return True

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class LatexChecker:
    """Decides whether LaTeX answers are equal, each comparison within ``timeout`` seconds.

    ``workers`` processes check in parallel (default: both cores of the
    project's machine), and ``spares`` more wait warm for a worker to be
    killed. Start-up (importing sympy) has its own, longer limit;
    a worker that does not start in time raises ``RuntimeError``. Use as a
    context manager or call :meth:`close`; workers also exit with their
    parent, whose pipe they read. Thread-safe (calls are serialised).
    """

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        startup_timeout: float = 60.0,
        workers: int = DEFAULT_WORKERS,
        spares: int = DEFAULT_SPARES,
    ):
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.workers = max(1, workers)
        self.spares = max(0, spares)
        self.stats = CheckerStats()
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()
        self._started_once = False
        self._cache: dict[tuple, bool] = {}  # (gold, predicted, rel_tol) -> answer, oldest first
        self._overran_now: set[tuple] = set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kills the workers, if any; the next call starts new ones."""
        with self._lock:
            for worker in self._pool:
                worker.kill()
            self._pool = []
            self._started_once = False

    def start(self) -> None:
        """Starts the workers and waits until they are ready (otherwise the first check does)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        self._fill()
        deadline = time.monotonic() + self.startup_timeout
        while not all(w.ready for w in self._pool):
            self._poll(max(0.0, deadline - time.monotonic()), [])
            if time.monotonic() > deadline:
                raise RuntimeError("the math-verify workers did not start")

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._pool]

    def _fill(self) -> None:
        while len(self._pool) < self.workers + self.spares:
            self._pool.append(_Worker())
            if self._started_once:
                self.stats.restarts += 1
        self._started_once = True

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._pool.remove(worker)
        self._fill()  # the replacement imports sympy while the others keep working

    def _poll(self, wait: float, results: list[bool | None]) -> None:
        """Waits up to ``wait`` seconds for any worker to answer or become ready."""
        fds = {w.fd: w for w in self._pool if not w.ready or w.job is not None}
        if not fds:
            return
        readable, _, _ = select.select(list(fds), [], [], wait)
        for fd in readable:
            worker = fds[fd]
            lines = worker.read_lines()
            if lines is None:  # died: its job (if any) is not equivalent
                _log.warning(
                    "math-verify worker %d died (exit status %s)%s; replacing it.",
                    worker.proc.pid,
                    worker.proc.poll(),
                    " on a check" if worker.job is not None else "",
                )
                if worker.job is not None:
                    results[worker.job] = False
                    self.stats.checks += 1
                self._replace(worker)
                continue
            for line in lines:
                if not worker.ready:
                    worker.ready = True  # the start-up line
                elif worker.job is not None:
                    elapsed = time.monotonic() - worker.sent
                    self.stats.slowest = max(self.stats.slowest, elapsed)
                    self.stats.checks += 1
                    try:
                        reply = json.loads(line)
                    except ValueError:
                        reply = None
                    in_step = isinstance(reply, dict) and reply.get("id") == worker.request_id
                    results[worker.job] = in_step and reply.get("equal") is True
                    worker.job = None
                    if not in_step:  # never take one check's answer for another's
                        _log.warning(
                            "math-verify worker %d answered out of step (%r); replacing it.",
                            worker.proc.pid,
                            line[:80],
                        )
                        self._replace(worker)
                        break

    def equivalent_many(
        self,
        pairs: Sequence[tuple[str, str]],
        rel_tol: float = DEFAULT_REL_TOL,
        *,
        within: float | None = None,
    ) -> list[bool]:
        """For each ``(gold, predicted)``, whether it is proved equal within the time limit.

        Checks run on all workers at once, each under ``timeout`` from the
        moment a worker takes it. With ``within`` (seconds), the whole call
        also ends by then, waiting for a restarting worker included: what is
        not checked by then is not equivalent. Never raises for any strings.
        """
        results: list[bool | None] = [None] * len(pairs)
        requests = []
        for i, (gold, predicted) in enumerate(pairs):
            key = (gold, predicted, rel_tol)
            if key in self._cache:  # answered before (an overrun is remembered as False)
                results[i] = self._cache[key]
                self.stats.cached += 1
                continue
            if len(gold) > MAX_ANSWER_CHARS or len(predicted) > MAX_ANSWER_CHARS:
                results[i] = False
                continue
            message = {"gold": _as_math(gold), "predicted": _as_math(predicted), "rel_tol": rel_tol}
            requests.append((i, key, message))
        if not requests:
            return [bool(r) for r in results]
        with self._lock:
            if not any(w.ready for w in self._pool) and not self._started_once:
                self._start_locked()  # the first start is not on any call's clock
            begin = time.monotonic()
            try:
                self._run(requests, results, None if within is None else begin + within)
            finally:
                self.stats.seconds += time.monotonic() - begin
            for i, key, _ in requests:
                if key not in self._overran_now:  # a check cut short by ``within`` may yet pass
                    self._remember(key, bool(results[i]))
            self._overran_now.clear()
        return [bool(r) for r in results]

    def _run(self, requests: list, results: list[bool | None], deadline: float | None) -> None:
        queue = list(reversed(requests))
        self._fill()
        while queue or any(w.job is not None for w in self._pool):
            for worker in self._pool:
                if queue and worker.ready and worker.job is None:
                    if sum(w.job is not None for w in self._pool) >= self.workers:
                        break  # the spares wait: no more checks at once than workers
                    job, key, request = queue.pop()
                    if not worker.send(job, request):
                        queue.append((job, key, request))
                        self._replace(worker)
                        break
                    worker.key = key
            busy = sum(w.job is not None for w in self._pool)
            self.stats.most_at_once = max(self.stats.most_at_once, busy)
            if queue and busy < self.workers:  # no ready worker free: the queue waits for a start
                self.stats.waits_for_a_start += 1
            now = time.monotonic()
            ends = [w.sent + self.timeout for w in self._pool if w.job is not None]
            ends += [w.started + self.startup_timeout for w in self._pool if not w.ready]
            if deadline is not None:
                ends.append(deadline)
            self._poll(max(0.0, min(ends) - now) if ends else 0.0, results)
            now = time.monotonic()
            for worker in list(self._pool):
                late = deadline is not None and now >= deadline
                if worker.job is not None and (now - worker.sent >= self.timeout or late):
                    results[worker.job] = False
                    self.stats.checks += 1
                    self.stats.timeouts += 1
                    self.stats.slowest = max(self.stats.slowest, now - worker.sent)
                    if now - worker.sent < self.timeout:
                        self._overran_now.add(worker.key)  # cut short by ``within``: not kept
                    worker.job = None
                    self._replace(worker)
                elif not worker.ready and now - worker.started >= self.startup_timeout:
                    self._replace(worker)
                    if not any(w.ready for w in self._pool):
                        raise RuntimeError("the math-verify worker did not start")
            if deadline is not None and time.monotonic() >= deadline:
                for job, key, _ in queue:
                    results[job] = False  # no worker was free in time (all were restarting)
                    self._overran_now.add(key)
                    self.stats.checks += 1
                    self.stats.timeouts += 1
                return

    def _remember(self, key: tuple, equal: bool) -> None:
        """Answers are kept, oldest dropped first: a policy repeats itself across batches.

        A pair that overran its full limit is kept as False, so it is refused at once after.
        """
        self._cache[key] = equal
        while len(self._cache) > MAX_REMEMBERED:
            del self._cache[next(iter(self._cache))]

    def equivalent(
        self,
        gold: str,
        predicted: str,
        rel_tol: float = DEFAULT_REL_TOL,
        *,
        within: float | None = None,
    ) -> bool:
        """True when ``predicted`` is proved equal to ``gold`` in time; never raises.

        The check has ``timeout`` seconds from the moment a worker takes it;
        an overrun is remembered, so the same pair is refused at once after.
        The whole call, a wait for a restarting worker included, ends within
        ``within`` seconds (default and at most: ``timeout`` plus
        DISPATCH_ALLOWANCE), plus the time to kill an overrunning worker; a
        check that ``within`` cut short of its ``timeout`` is not remembered.
        """
        limit = self.timeout + DISPATCH_ALLOWANCE
        limit = limit if within is None else min(within, limit)
        return self.equivalent_many([(gold, predicted)], rel_tol, within=limit)[0]


def _is_number(expr) -> bool:
    from sympy import Expr

    return isinstance(expr, Expr) and not expr.free_symbols and expr.is_number


def _numbers_equal(gold, predicted, rel_tol: float) -> bool:
    """Exact values must be proved equal; a side holding a decimal gets ``rel_tol``."""
    from sympy import Float, N, nsimplify, simplify

    difference = N(gold - predicted, 30)
    scale = max(abs(N(gold, 30)), abs(N(predicted, 30)))
    if gold.has(Float) or predicted.has(Float):
        return bool(abs(difference) <= rel_tol * scale)
    if abs(difference) > 1e-25 * max(scale, 1):
        return False  # evaluated to 30 digits and not zero: a proof of inequality
    exact = gold - predicted
    return bool(exact == 0 or simplify(exact) == 0 or nsimplify(exact) == 0 or exact.equals(0))


def _compare(gold_latex: str, predicted_latex: str, rel_tol: float) -> bool:
    from math_verify import parse, verify

    gold = parse(gold_latex, parsing_timeout=None)
    predicted = parse(predicted_latex, parsing_timeout=None)
    if not gold or not predicted:
        return False
    if _is_number(gold[0]) and _is_number(predicted[0]):
        return _numbers_equal(gold[0], predicted[0], rel_tol)
    return bool(verify(gold, predicted, timeout_seconds=None))


_WARM_UP = [
    ("\\sqrt{4}", "2"),
    ("x+1", "1+x"),
    ("[1,2)", "(1,2]"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("x=1", "1"),
    ("\\frac{\\sqrt{3}}{2}", "0.866"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("6-5i", "-5i+6"),
]


def _serve() -> None:
    """Worker loop: one JSON request per line in, ``true``/``false`` per line out."""
    from rl_reason.rewards.parallel import limit_worker

    limit_worker(WORKER_MEMORY_LIMIT)  # and no core dumps, a lower priority
    logging.disable(logging.WARNING)  # math-verify warns that we disabled its timeouts
    for gold, predicted in _WARM_UP:  # first uses load parsers and caches; not on a check's clock
        try:
            _compare(f"${gold}$", f"${predicted}$", DEFAULT_REL_TOL)
        except Exception:  # noqa: BLE001
            pass
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    out.write(b"null\n")
    out.flush()
    for line in sys.stdin.buffer:
        request_id = None
        try:
            request = json.loads(line)
            request_id = request.get("id")
            result = _compare(request["gold"], request["predicted"], float(request["rel_tol"]))
        except Exception:  # noqa: BLE001 -- any failure on untrusted input means "not equivalent"
            result = False
        out.write(json.dumps({"id": request_id, "equal": bool(result)}).encode() + b"\n")
        out.flush()

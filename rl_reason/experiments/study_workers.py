"""The study's stages side by side: one worker process per CPU, each on one CPU.

A small model's step gains little from a second CPU (XLA:CPU's threads meet at every
op: the study's PPO stage ran 1.49x faster on two CPUs than on one), so on a CPU host
two stages at once, one CPU each, do more in the same time. Each worker is pinned to
one CPU before JAX starts, so every stage it runs computes with one thread: its numbers
are the same whatever the number of workers, the machine's core count or the order
the stages ran in. Stages that every other stage waits for (pretraining) run first in
the calling process, on every CPU, as the whole job did before (`leading_stages`):
their numbers, and so the later stages' inputs, still depend on the core count.

    pool = StagePool(workers=2)        # `study.workers`; see `default_workers`
    pool.run(pending, workdir, on_start=..., on_done=...)

As `rewards/parallel.py`'s workers, these are plain `python -c` processes that import
only this package (a "spawn" would re-import the caller's main module), and stages and
results cross their pipes as JSON (tuples tagged, so a stage's config arrives as it
was). A worker's failure stops the others (SIGTERM: each saves at its next step) and
raises `StageFailedError` naming the stage; a preemption signal to this process is
passed to every worker, and `checkpointing.Preempted` is raised once they have saved.
Workers die with this process (Linux's parent-death signal): a killed job leaves
nothing running.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from rl_reason import checkpointing
from rl_reason.experiments.config import InvalidConfigError
from rl_reason.experiments.study_plan import Stage

RUN_STAGE = ("rl_reason.experiments.study", "run_stage")  # (module, function) workers call
# The settings a worker copies from this process's JAX config (the compilation cache the
# launcher chose, numerics a caller set): a new process starts from JAX's defaults.
_JAX_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_compilation_cache_max_size",
    "jax_default_matmul_precision",
    "jax_enable_x64",
    "jax_debug_nans",
)
_SIGNALS = checkpointing.PreemptionGuard.SIGNALS  # what a run saves on, and the pool passes on
_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


class StageFailedError(RuntimeError):
    """A stage failed in a worker process: its name, the error's type and message, and
    the worker's traceback (`details`; empty for the errors a user acts on)."""

    def __init__(self, stage: str, error: str, message: str, details: str = ""):
        super().__init__(f"stage {stage} failed: {error}: {message}")
        self.stage, self.error, self.details = stage, error, details


def default_workers(requested: int) -> int:
    """`study.workers`: 1 on a multi-host run (every process runs each stage on the whole
    mesh), else a positive number as given, and 0 one per CPU this process may use on a
    CPU host, 1 on an accelerator (a stage has the devices to itself)."""
    import jax

    if requested < 0:
        raise InvalidConfigError([f"study.workers is {requested}: give 0 (one per CPU) or more."])
    if jax.process_count() > 1:
        return 1
    if requested > 0:
        return requested
    return len(_usable_cpus()) if jax.default_backend() == "cpu" else 1


def _usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def leading_stages(pending: Sequence[Stage]) -> list[Stage]:
    """The pending stages, from the first on, that every later pending stage waits for
    (directly or through others): nothing can run beside them."""
    lead = []
    for i, stage in enumerate(pending):
        if all(stage.name in _waits_for(later, pending) for later in pending[i + 1 :]):
            lead.append(stage)
        else:
            break
    return lead


def _waits_for(stage: Stage, pending: Sequence[Stage]) -> set[str]:
    """The pending stages `stage` needs, directly or through others."""
    by_name = {s.name: s for s in pending}
    seen, todo = set(), [n for n in stage.needs if n in by_name]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(n for n in by_name[name].needs if n in by_name)
    return seen


class StagePool:
    """Runs a study's pending stages on `workers` processes, as their `needs` allow.

    `run_stage` names the module-level function(stage kind, config, directory) ->
    metrics the workers call (the study's own; tests give theirs)."""

    def __init__(self, workers: int, run_stage: tuple[str, str] = RUN_STAGE):
        self.workers, self.run_stage = workers, run_stage

    def run(
        self,
        pending: Sequence[Stage],
        workdir: str,
        on_start: Callable[[Stage], None],
        on_done: Callable[[Stage, dict[str, Any], float], None],
    ) -> None:
        """Runs `pending` (in plan order; what they need and is not pending has finished):
        on_start(stage) when a worker takes it, on_done(stage, metrics, seconds) when it
        finishes, both in this process (one process writes the records)."""
        cpus = _usable_cpus()
        workers = [
            _Worker(self.run_stage, cpus[i % len(cpus)])
            for i in range(min(self.workers, len(pending)))
        ]
        forwarder = _Forwarder(workers)
        try:
            _schedule(list(pending), workdir, workers, on_start, on_done, forwarder)
        finally:
            forwarder.restore()
            for worker in workers:
                if worker.stage is not None:  # this process failed: the stage saves first
                    worker.signal(signal.SIGTERM)
            for worker in workers:
                worker.close()


def _schedule(pending, workdir, workers, on_start, on_done, forwarder) -> None:
    """Hands ready stages (training before evaluations, then plan order) to idle workers
    until every stage finished, one failed or a signal came."""
    names = {s.name for s in pending}
    finished: set[str] = set()
    waiting = sorted(pending, key=lambda s: s.kind != "train")  # sorted() is stable
    preempted: list[tuple[int, str]] = []
    failure: BaseException | None = None
    while True:
        if failure is None and not preempted and not forwarder.signalled:
            for worker in [w for w in workers if w.stage is None and w.alive]:
                ready = [
                    s for s in waiting if all(n in finished or n not in names for n in s.needs)
                ]
                if not ready:
                    break
                waiting.remove(ready[0])
                worker.give(ready[0], os.path.join(workdir, ready[0].name))
                on_start(ready[0])
        busy = [w for w in workers if w.stage is not None]
        if not busy:
            break
        readable = multiprocessing.connection.wait([w.reader for w in busy])
        for worker in [w for w in busy if w.reader in readable]:
            stage, seconds = worker.stage, time.perf_counter() - worker.began
            kind, *body = worker.receive()
            if kind == "done":
                finished.add(stage.name)
                on_done(stage, body[0], seconds)
            elif kind == "preempted":
                preempted.append((body[0], body[1]))
            elif failure is None:  # the first failure stops the others (each saves first)
                if kind == "interrupted":
                    failure = KeyboardInterrupt()
                else:
                    failure = StageFailedError(stage.name, *body)
                for other in workers:
                    other.signal(signal.SIGTERM)
    if failure is not None:
        raise failure
    if preempted or forwarder.signalled:
        if preempted:
            raise checkpointing.Preempted(*preempted[0])
        stopped = checkpointing.Preempted(0, workdir)
        stopped.args = (
            f"Preempted between stages. Run the same command with --workdir={workdir} to resume.",
        )
        raise stopped
    if len(finished) < len(pending):
        left = ", ".join(s.name for s in pending if s.name not in finished)
        raise StageFailedError(left, "WorkerDied", "every worker stopped before these stages")


class _Worker:
    """One worker process and its two pipes (stages in, results out, as JSON lines)."""

    def __init__(self, run_stage: tuple[str, str], cpu: int):
        to_worker, self._task_end = os.pipe()
        self._result_end, from_worker = os.pipe()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        boot = (  # signals held from the first line until `_serve` has its handlers
            f"import signal; signal.pthread_sigmask(signal.SIG_BLOCK, {[int(s) for s in _SIGNALS]}); "
            f"import os; hasattr(os, 'sched_setaffinity') and os.sched_setaffinity(0, {{{cpu}}}); "
            f"import sys; sys.path.insert(0, {root!r}); "
            "from rl_reason.experiments.study_workers import _serve; "
            f"_serve({to_worker}, {from_worker}, {os.getpid()}, {json.dumps(_settings())!r}, "
            f"{list(run_stage)!r})"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", boot], pass_fds=(to_worker, from_worker)
        )
        os.close(to_worker)
        os.close(from_worker)
        self._tasks = os.fdopen(self._task_end, "w")
        self.reader = os.fdopen(self._result_end, "r")
        self.stage: Stage | None = None
        self.began = 0.0

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def give(self, stage: Stage, directory: str) -> None:
        self.stage, self.began = stage, time.perf_counter()
        task = {"kind": stage.kind, "config": encode(stage.config), "directory": directory}
        try:
            self._tasks.write(json.dumps(task) + "\n")
            self._tasks.flush()
        except OSError:  # it died booting: `receive` reads its end and reports it
            pass

    def receive(self) -> list[Any]:
        """The worker's answer to its stage; a worker that died is a failure."""
        self.stage, line = None, self.reader.readline()
        if line:
            return json.loads(line)
        code = self.process.wait()
        return ["failed", "WorkerDied", f"its process exited with status {code}", ""]

    def signal(self, signum: int) -> None:
        if self.alive:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Tells an idle worker to stop (closing its task pipe) and waits for it."""
        for stream in (self._tasks, self.reader):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Forwarder:
    """This process's SIGTERM, SIGINT and SIGHUP while the pool runs: passed on to every
    worker as SIGTERM (save at the next step); no further stage starts."""

    def __init__(self, workers: Sequence[_Worker]):
        self.workers, self.signalled = workers, False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in _SIGNALS}

    def _handle(self, signum, frame) -> None:
        del frame
        self.signalled = True
        name = signal.Signals(signum).name
        print(f"Received {name}: the running stages save and stop.", file=sys.stderr)
        for worker in self.workers:
            worker.signal(signal.SIGTERM)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def encode(value: Any) -> Any:
    """A config as JSON whose decoding is the same config: ConfigDicts and tuples tagged."""
    if isinstance(value, ml_collections.ConfigDict):
        return {"__config__": {k: encode(v) for k, v in value.items()}}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {"__dict__": {k: encode(v) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a stage's config holds {type(value).__name__} {value!r}: not sendable")


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        ((tag, body),) = value.items()
        if tag == "__tuple__":
            return tuple(decode(v) for v in body)
        items = {k: decode(v) for k, v in body.items()}
        return ml_collections.ConfigDict(items) if tag == "__config__" else items
    return value


def _settings() -> dict[str, Any]:
    """This process's JAX settings and log level, which a worker starts with."""
    import jax
    from absl import logging

    jax_settings = {name: getattr(jax.config, name) for name in _JAX_SETTINGS}
    return {"jax": jax_settings, "verbosity": logging.get_verbosity()}


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _serve(tasks_fd, results_fd, parent, settings, run_stage) -> None:
    """A worker's life, pinned to its CPU by its boot line before JAX is imported (XLA
    sizes its thread pools by the CPUs a process may use): one stage per task line until
    the pipe closes."""
    _die_with_parent(parent)
    import jax
    from absl import logging

    from rl_reason.experiments import cli

    # A signal is kept for the stage running or about to: its run's guard, once set up,
    # saves at the next step (the pool gives no stage after a signal).
    for sig in _SIGNALS:
        signal.signal(sig, checkpointing.PreemptionGuard.note_early_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # what came while booting lands now
    settings = json.loads(settings)

    for name, value in settings["jax"].items():
        if value != getattr(jax.config, name):
            jax.config.update(name, value)
    logging.set_verbosity(settings["verbosity"])
    function = getattr(importlib.import_module(run_stage[0]), run_stage[1])
    with os.fdopen(tasks_fd, "r") as tasks, os.fdopen(results_fd, "w") as results:
        for line in tasks:
            task = json.loads(line)
            try:
                metrics = function(task["kind"], decode(task["config"]), task["directory"])
                answer = ["done", metrics]
            except checkpointing.Preempted as e:
                answer = ["preempted", e.step, task["directory"]]
            except KeyboardInterrupt:
                answer = ["interrupted"]
            except Exception as e:  # noqa: BLE001 -- the pool stops the others and raises it
                details = "" if isinstance(e, cli.user_errors()) else traceback.format_exc()
                answer = ["failed", type(e).__name__, str(e), details]
            results.write(json.dumps(answer) + "\n")
            results.flush()
            if answer[0] != "done":
                return

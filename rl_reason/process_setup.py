"""Process-wide settings the launchers apply before any work, to run faster on the same machine.

    from rl_reason import process_setup

    process_setup.use_huge_page_malloc()          # first thing: may restart the process
    process_setup.fit_cpus_to_quota()             # before JAX sizes its thread pools
    ...
    process_setup.use_compilation_cache(workdir)  # once the workdir is known

All three were found where the study in miniature spends a slower machine's time
(BENCHMARKS.md, "On a machine of half the speed"). The first and the last leave every
number bitwise as it was; the second changes a run's last bits as any other core count does.

- XLA:CPU allocates a step's large temporaries afresh at every step, and glibc hands that
  memory back to the kernel when it is freed (per-thread arenas, mmap'd blocks), so every
  step faults its pages in again: 4.3 million minor faults in 150 of the study's pretraining
  steps, 15% of their CPU time spent in the kernel. glibc's `glibc.malloc.hugetlb=1` tunable
  backs malloc's memory with transparent huge pages (62 times fewer faults a step). Tunables are
  read when a process starts, so `use_huge_page_malloc` re-executes the launcher once with
  the tunable set. `RL_REASON_HUGE_PAGE_MALLOC=0` turns it off (under a debugger, say).
- A CPU quota (a container's CPU limit, a cgroup's `cpu.max`) below the cores a process may
  run on: XLA:CPU sizes its thread pools by the cores, and under the quota its threads are
  throttled in turn and wait for each other at every op's barrier. The study's training
  step under a quota of 0.83 CPU on 2 cores took 0.395 s with two threads and 0.282 s on one
  core. `fit_cpus_to_quota` confines the process to as many cores as the quota has (rounded
  up), as Go's and Java's runtimes size themselves to a container;
  `RL_REASON_FIT_CPUS_TO_QUOTA=0` keeps every core.
- JAX's persistent compilation cache: a resumed or rerun job compiles nothing again (within
  one job it finds little: the stages' programs differ, and the repeated ones are shared in
  memory; 8 of the study's 125 compilations). `use_compilation_cache` keeps compiled programs under the workdir unless the user chose a
  cache of their own (`JAX_COMPILATION_CACHE_DIR`); `RL_REASON_COMPILATION_CACHE=0` turns it off.
"""

from __future__ import annotations

import math
import os
import platform
import sys

HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
COMPILATION_CACHE_DIR = "compilation_cache"  # under the workdir
# Programs that compile faster than this are not worth a file (XLA:CPU compiles the
# study's small helper programs in a few milliseconds; its steps and samplers in seconds).
_MIN_COMPILE_SECONDS = 0.2
# A bound on the cache's size (least recently used entries go first); it also turns on
# JAX's file lock around every read and write, so that processes of one host sharing a
# workdir never read an entry another is still writing.
_MAX_CACHE_BYTES = 4 << 30


def _huge_pages_available() -> bool:
    """True when the kernel gives transparent huge pages to a process that asks (madvise)."""
    try:
        with open(_THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _tunables_with_huge_pages() -> str | None:
    """GLIBC_TUNABLES with huge-page malloc added; None where it is chosen already (on or
    off), turned off here, or not available (not Linux, not glibc, no transparent huge pages)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        os.environ.get("RL_REASON_HUGE_PAGE_MALLOC", "1") == "0"
        or "glibc.malloc.hugetlb" in tunables  # set by us before a restart, or by the user
        or sys.platform != "linux"
        or platform.libc_ver()[0] != "glibc"
        or not _huge_pages_available()
    ):
        return None
    return ":".join(t for t in (tunables, HUGE_PAGE_TUNABLE) if t)


def use_huge_page_malloc() -> None:
    """Restarts this process with glibc's huge-page malloc, once (a no-op where
    `_tunables_with_huge_pages` says so): the launchers' first call."""
    tunables = _tunables_with_huge_pages()
    if tunables is None:
        return
    os.environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def use_huge_page_malloc_in_new_processes() -> None:
    """Huge-page malloc for the processes this one starts (they inherit the environment),
    without restarting this one: pytest's workers and the launchers the tests start."""
    tunables = _tunables_with_huge_pages()
    if tunables is not None:
        os.environ["GLIBC_TUNABLES"] = tunables


def _read_quota(directory: str) -> float | None:
    """The CPU limit one cgroup directory sets, in cores (v2 `cpu.max`, v1 CFS quota)."""
    try:
        with open(os.path.join(directory, "cpu.max")) as f:  # cgroup v2: "83000 100000"
            quota, period = f.read().split()[:2]
    except OSError:
        try:
            with open(os.path.join(directory, "cpu.cfs_quota_us")) as f:  # cgroup v1
                quota = f.read().strip()
            with open(os.path.join(directory, "cpu.cfs_period_us")) as f:
                period = f.read().strip()
        except OSError:
            return None
    except ValueError:
        return None
    if quota in ("max", "-1") or not quota.lstrip("-").isdigit() or not period.isdigit():
        return None
    return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None


_CGROUP_ROOTS_V1 = (
    "/sys/fs/cgroup/cpu",
    "/sys/fs/cgroup/cpu,cpuacct",
    "/sys/fs/cgroup/cpuacct,cpu",
)
_CGROUP_ROOTS_V2 = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


def cpu_quota_cores(
    cgroup_file: str = "/proc/self/cgroup",
    roots_v1: tuple[str, ...] = _CGROUP_ROOTS_V1,
    roots_v2: tuple[str, ...] = _CGROUP_ROOTS_V2,
) -> float | None:
    """The CPU time this process's cgroups allow, in cores: the smallest limit on the way
    from its cgroup to the root, v1 or v2. None where nothing limits it (or nothing can be read)."""
    try:
        with open(cgroup_file) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            roots = roots_v2
        elif "cpu" in controllers.split(","):
            roots = roots_v1
        else:
            continue
        for root in roots:
            if not os.path.isdir(root):
                continue
            relative = path.strip("/")
            while True:
                limit = _read_quota(os.path.join(root, relative))
                if limit is not None:
                    limits.append(limit)
                if not relative:
                    break
                relative = os.path.dirname(relative)
    return min(limits) if limits else None


def cpus_for_quota(quota: float | None, cpus: list[int], pid: int) -> list[int]:
    """The CPUs a process with `quota` cores of CPU time should run on: all of `cpus` when the
    quota has as many cores or there is none, else ceil(quota) of them, starting at a place
    set by the pid (processes of one host sharing a quota spread over its cores)."""
    if quota is None or math.ceil(quota) >= len(cpus):
        return list(cpus)
    cpus = sorted(cpus)
    return sorted(cpus[(pid + i) % len(cpus)] for i in range(max(1, math.ceil(quota))))


def fit_cpus_to_quota() -> None:
    """Confines this process to as many cores as its CPU quota has (see the module's
    docstring); a no-op without a quota below the cores it may use, or where turned off."""
    if os.environ.get("RL_REASON_FIT_CPUS_TO_QUOTA", "1") == "0" or not hasattr(
        os, "sched_setaffinity"
    ):
        return
    quota = cpu_quota_cores()
    allowed = sorted(os.sched_getaffinity(0))
    chosen = cpus_for_quota(quota, allowed, os.getpid())
    if len(chosen) < len(allowed):
        os.sched_setaffinity(0, chosen)
        print(
            f"rl_reason: a CPU quota of {quota:.2f} cores: running on {len(chosen)} of"
            f" {len(allowed)} CPUs (RL_REASON_FIT_CPUS_TO_QUOTA=0 keeps them all)",
            file=sys.stderr,
        )


def use_compilation_cache(workdir: str) -> None:
    """Keeps compiled programs in `workdir`/compilation_cache, unless the user set a cache
    directory of their own or turned the cache off."""
    import jax

    if os.environ.get("RL_REASON_COMPILATION_CACHE", "1") == "0":
        return
    if jax.config.jax_compilation_cache_dir:  # the user's own (JAX_COMPILATION_CACHE_DIR)
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, COMPILATION_CACHE_DIR))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", _MAX_CACHE_BYTES)

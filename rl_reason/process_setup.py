"""Process-wide settings the launchers apply before any work: faster, never a different number.

    from rl_reason import process_setup

    process_setup.use_huge_page_malloc()          # first thing: may restart the process
    ...
    process_setup.use_compilation_cache(workdir)  # once the workdir is known

Both were found where the study in miniature spends a slower machine's time
(BENCHMARKS.md, "On a machine of half the speed"); both leave every number bitwise as it was.

- XLA:CPU allocates a step's large temporaries afresh at every step, and glibc hands that
  memory back to the kernel when it is freed (per-thread arenas, mmap'd blocks), so every
  step faults its pages in again: 4.3 million minor faults in 150 of the study's pretraining
  steps, 15% of their CPU time spent in the kernel. glibc's `glibc.malloc.hugetlb=1` tunable
  backs malloc's memory with transparent huge pages (512 times fewer faults). Tunables are
  read when a process starts, so `use_huge_page_malloc` re-executes the launcher once with
  the tunable set. `RL_REASON_HUGE_PAGE_MALLOC=0` turns it off (under a debugger, say).
- JAX's persistent compilation cache: the study compiles the same samplers and steps in many
  stages, and a resumed run compiles everything it compiled before the interruption.
  `use_compilation_cache` keeps compiled programs under the workdir unless the user chose a
  cache of their own (`JAX_COMPILATION_CACHE_DIR`); `RL_REASON_COMPILATION_CACHE=0` turns it off.
"""

from __future__ import annotations

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

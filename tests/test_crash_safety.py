"""Crash safety (issue 13): no bad checkpoint becomes the latest, preemption saves,
damage is caught and fallen back from, TensorBoard agrees with metrics.jsonl, a
failed resume changes nothing.

The end-to-end tests run `launch/train.py` in subprocesses with a tiny model (as
tests/test_resume.py does) and are marked slow; the Checkpointer and
MetricWriter unit tests below them run in-process on small trees.
"""

import asyncio
import gc
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore
from jax.sharding import NamedSharding, PartitionSpec as P

from rl_reason import checkpointing
from rl_reason import logging as run_logging
from rl_reason.algorithms import optimizer
from rl_reason.algorithms import train_state as ts
from rl_reason.experiments import config as config_lib
from rl_reason.experiments import sft as sft_experiment
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from subprocess_runs import wait_for as _wait_for  # polls; fails if the process exits first
from test_resume import TINY as RESUME_TINY

# The seed of every "random" choice below (kill points); change it to explore others.
SEED = 13

# As tests/test_resume.py, with TensorBoard on: 64 examples, batches of 16, 7 steps,
# a checkpoint every step (the newest 3 kept), a record every step, eval at the end.
TINY = [
    *(flag for flag in RESUME_TINY if not flag.startswith("--config.logging.tensorboard")),
    "--config.logging.tensorboard=True",
]


# --------------------------------------------------------------------------- helpers

def _command(repo_root, workdir, *extra):
    script = str(repo_root / "launch" / "train.py")
    return [sys.executable, script, f"--workdir={workdir}", *TINY, *extra]


def _train(repo_root, workdir, *extra):
    return subprocess.run(
        _command(repo_root, workdir, *extra),
        capture_output=True,
        text=True,
        timeout=900,
    )


def _start(repo_root, workdir, *extra):
    return subprocess.Popen(
        _command(repo_root, workdir, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ok(result):
    assert result.returncode == 0, result.stderr[-4000:]


def _records(workdir):
    """metrics.jsonl strictly: every line a whole record."""
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _records_so_far(workdir):
    """metrics.jsonl of a running (or killed) process: a line being written is skipped."""
    return run_logging.read_metrics(str(workdir))


def _snapshot(directory):
    """{relative path: sha256} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _restore_run(workdir, step):
    """(host TrainState, progress) of checkpoint `step` of a run, verified against its
    checksums; an explicit step, so a damaged one raises instead of being moved aside."""
    config = config_lib.base_config()
    with open(workdir / "config.json") as f:
        saved = json.load(f)
    config.model.update(saved["model"])
    config.optim.update(saved["optim"])
    tokenizer = sft_experiment.tokenizer_lib.load_tokenizer(str(workdir / "tokenizer"))
    model = sft_experiment.Transformer(sft_experiment.model_config(config, tokenizer))
    tx, _ = optimizer.make_optimizer(config.optim, saved["train"]["num_steps"])
    mesh = mesh_lib.make_mesh((-1, 1, 1))
    abstract = ts.abstract_train_state(model, tx, mesh, shd.DEFAULT_RULES)
    ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
    try:
        target = checkpointing.train_state_items("policy", abstract)
        items, progress, _ = ckpt.restore(target, step=step)
    finally:
        ckpt.close()
    return jax.device_get(checkpointing.merge_train_state("policy", items)), progress


def _steps(workdir):
    ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def _assert_same_run(got, want):
    """Bitwise: every metrics record (eval included) and every array of the final state."""
    assert _records(got) == _records(want)
    steps = _steps(want)
    assert _steps(got)[-1] == steps[-1]
    state_a, progress_a = _restore_run(got, steps[-1])
    state_b, progress_b = _restore_run(want, steps[-1])
    assert progress_a == progress_b
    assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(a, b)


def _tfrecords(path):
    """The payloads of a TFRecord file (8-byte length, its masked CRC32C, data, its
    masked CRC32C), and whether the file ends on a record boundary (a kill can cut
    the last record; TensorBoard skips such a tail too)."""
    from tensorboardX.record_writer import masked_crc32c

    data = path.read_bytes()
    payloads, pos = [], 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert header_crc == masked_crc32c(header), f"{path}: bad length CRC at byte {pos}"
        end = pos + 12 + length + 4
        if end > len(data):
            break
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[end - 4 : end])
        assert payload_crc == masked_crc32c(payload), f"{path}: bad data CRC at byte {pos}"
        payloads.append(payload)
        pos = end
    return payloads, pos == len(data)


def _tensorboard_scalars(workdir, complete=True):
    """{tag: [(step, value), ...]} from every event file under workdir/tensorboard."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted((workdir / "tensorboard").rglob("events.out.tfevents.*")):
        payloads, whole = _tfrecords(path)
        if complete:
            assert whole, f"{path} ends inside a record"
        for payload in payloads:
            event = event_pb2.Event()
            event.ParseFromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _jsonl_scalars(records):
    """{tag: [(step, value as float32), ...]}: what TensorBoard should hold."""
    scalars = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return scalars


def _first_chunk(item_dir):
    """(data file, offset, length) of the first array chunk stored outside the B-tree.

    Orbax writes each process's OCDBT database (`ocdbt.process_0/`: data files of
    the arrays' chunks, that process's B-tree nodes after them), then merges the
    B-trees into the item's root (`<item>/manifest.ocdbt`, `<item>/d/`). A restore
    reads the root and, through it, the chunks, never the per-process B-tree again;
    arrays under 1 KiB sit inside the B-tree nodes themselves. Which data file a
    chunk lands in, and where, depends on the order its writes finished in (a bit
    flipped a quarter of the way into the largest file once hit no chunk in CI), so
    the damage is aimed through the index that a restore reads.
    """
    kvstore = tensorstore.KvStore.open({"driver": "file", "path": f"{item_dir}/"}).result()
    (version,) = tensorstore.ocdbt.dump(kvstore).result()["versions"]
    # One B-tree node holds every key (orbax's nodes may reach 100 MB decoded).
    assert version["root_height"] == 0, version
    root = tensorstore.ocdbt.dump(kvstore, version["root"]["location"]).result()
    chunks = [(e["key"], e["indirect_value"]) for e in root["entries"] if "indirect_value" in e]
    assert chunks, f"every array of {item_dir} is stored inside its B-tree"
    # "value:<database>:<data file>:<offset>:<length>", the database ending in "/".
    location = min(chunks)[1].removeprefix("value:")
    database_and_file, offset, length = location.rsplit(":", 2)
    database, data_file = database_and_file.split(":", 1)
    return item_dir / database / data_file, int(offset), int(length)


def _flip_a_bit(item_dir):
    """One bit in the middle of a chunk: zstd may fail to decode it, or decode it to
    other values (a NaN among them, perhaps)."""
    path, offset, length = _first_chunk(item_dir)
    data = bytearray(path.read_bytes())
    data[offset + length // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(item_dir):
    """The data file cut in the middle of a chunk."""
    path, offset, length = _first_chunk(item_dir)
    path.write_bytes(path.read_bytes()[: offset + length // 2])


def _remove_manifest(item_dir):
    (item_dir / "manifest.ocdbt").unlink()


def _flip_a_bit_in_the_index(item_dir):
    """The merged B-tree (`<item>/d/`), which every restore reads."""
    (path,) = [p for p in (item_dir / "d").iterdir() if p.is_file()]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {"bit_flip": _flip_a_bit, "truncation": _truncate, "missing_manifest": _remove_manifest}
DETECTED = ("do not match their checksums", "reads back with NaN or inf", "its arrays do not read")


def _rewrite_checksum(step_dir, item):
    """Silent corruption: the arrays decode, but one stored checksum no longer matches."""
    path = step_dir / checkpointing.INTEGRITY / "metadata"
    record = json.loads(path.read_text())
    sums = record["items"][item]["checksums"]
    sums[0] = (sums[0] + 1) % 2**32
    path.write_text(json.dumps(record))


# ------------------------------------------------------------- end-to-end (subprocess)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, repo_root):
    """An uninterrupted TINY run: what every interrupted one must end equal to."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    _ok(_train(repo_root, workdir))
    assert [r["step"] for r in _records(workdir)] == list(range(1, 8))
    return workdir


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory, repo_root):
    """A TINY run stopped after step 4 (checkpoints 2, 3, 4); tests work on copies."""
    workdir = tmp_path_factory.mktemp("stopped") / "run"
    _ok(_train(repo_root, workdir, "--config.train.stop_after=4"))
    assert _steps(workdir) == [2, 3, 4]
    return workdir


@pytest.mark.slow
def test_nan_between_save_and_log_steps_is_never_saved_and_the_run_resumes(tmp_path, repo_root):
    """Issue 13's first failure: saves every 5 steps, logs every 7, the lr diverges."""
    workdir = tmp_path / "nan"
    nan_run = [
        "--config.data.num_train=640",
        "--config.train.num_steps=12",
        "--config.train.log_every=7",
        "--config.train.eval_every=100",
        "--config.checkpoint.save_interval_steps=5",
    ]
    r = _train(repo_root, workdir, *nan_run, "--config.optim.lr=1e6")
    assert r.returncode == 1, r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    match = re.search(r"step (\d+) is not finite \(([^)]*)\)", r.stderr)
    assert match, r.stderr[-4000:]
    bad_step, quantities = int(match.group(1)), match.group(2)
    assert re.search(r"(loss|grad_norm|param_norm)=(nan|inf|-inf)", quantities), quantities
    # The failing step's record is kept for the post-mortem (not a log step: 7 never came).
    records = _records(workdir)
    assert records[-1]["step"] == bad_step and records[-1]["finite"] == 0.0
    steps = _steps(workdir)
    assert steps and max(steps) < bad_step, (steps, bad_step)
    assert f"the last checkpoint, step {max(steps)}, is intact" in r.stderr
    for step in steps:  # every saved state reads back verified and finite
        state, _ = _restore_run(workdir, step)
        assert int(state.step) == step
        for leaf in jax.tree.leaves(state):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                assert np.isfinite(leaf).all()

    r = _train(repo_root, workdir, *nan_run, "--config.optim.lr=1e-3")
    _ok(r)
    # Resumed (a run from scratch would fail to save step 1 again: steps only rise).
    records = _records(workdir)
    assert [rec["step"] for rec in records] == [7, 12]
    assert all(rec["finite"] == 1.0 for rec in records)
    state, _ = _restore_run(workdir, 12)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_bitwise(
    tmp_path, repo_root, reference, stopped_at_4, damage
):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_at_4, workdir)
    # Mark the records of steps 3 and 4: a resume from step s keeps the records up to
    # s and redoes the rest, so afterwards only 3's mark shows it resumed from 3.
    lines = []
    for record in _records(workdir):
        if record["step"] in (3, 4):
            record["mark"] = "before the resume"
        lines.append(json.dumps(record) + "\n")
    (workdir / "metrics.jsonl").write_text("".join(lines))
    DAMAGE[damage](workdir / "checkpoints" / "4" / "policy.params")
    damaged = _snapshot(workdir / "checkpoints" / "4")

    r = _train(repo_root, workdir)
    _ok(r)
    assert re.search(r"Checkpoint 4 in \S+ is damaged: .+ Moved to ", r.stderr), r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    # Moved aside, never deleted: the damaged files are all still there, byte for byte.
    quarantine = workdir / "checkpoints_quarantine"
    moved = [p for p in quarantine.iterdir() if p.is_dir()]
    assert [p.name.split(".")[0] for p in moved] == ["4"]
    assert _snapshot(moved[0]) == damaged
    reason = (quarantine / f"{moved[0].name}.reason.txt").read_text()
    # What the flipped bits do depends on where the chunks were written: a value
    # changed, a NaN, or a chunk zstd cannot decode.
    assert any(cause in reason for cause in DETECTED), reason

    records = _records(workdir)
    marks = [rec.get("mark") for rec in records]
    assert marks == [None, None, "before the resume", None, None, None, None]
    for record in records:
        record.pop("mark", None)
    with open(workdir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    _assert_same_run(workdir, reference)


@pytest.mark.slow
def test_sigterm_saves_where_it_stops_and_the_same_command_ends_bitwise_equal(
    tmp_path, repo_root, reference
):
    k = random.Random(SEED).randint(1, 4)  # records to wait for before the SIGTERM
    workdir = tmp_path / "run"
    proc = _start(repo_root, workdir)
    _wait_for(proc, lambda: len(_records_so_far(workdir)) >= k, f"{k} records")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == checkpointing.PREEMPTED_EXIT_CODE, (k, err[-4000:])
    match = re.search(
        r"Preempted: saved step (\d+) and stopped\. Run the same command with (\S+) to resume", err
    )
    assert match, err[-4000:]
    stopped = int(match.group(1))
    assert match.group(2) == f"--workdir={workdir}"
    assert "Traceback" not in err
    # Record k is written in step k, just before the loop asks whether to stop.
    assert stopped in (k, k + 1), (k, stopped)
    assert _steps(workdir)[-1] == stopped
    state, _ = _restore_run(workdir, stopped)  # verifies against its checksums
    assert int(state.step) == stopped
    assert [r["step"] for r in _records(workdir)] == list(range(1, stopped + 1))

    # The same command; this time the SIGTERM comes in the last step (once checkpoint
    # 6 is on disk, step 7 and its evaluation are under way): the run has nothing
    # left to save for, so it finishes normally.
    proc = _start(repo_root, workdir)
    _wait_for(proc, lambda: (workdir / "checkpoints" / "6").is_dir(), "checkpoint 6")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert "final metrics: {'step': 7," in out
    _assert_same_run(workdir, reference)


@pytest.mark.slow
def test_tensorboard_agrees_with_metrics_after_sigkills(tmp_path, repo_root):
    rng = random.Random(SEED)
    workdir = tmp_path / "run"
    longer = ["--config.train.num_steps=12", "--config.train.eval_every=6"]
    kill_points = []
    for _ in range(rng.randint(2, 3)):
        before = max((r["step"] for r in _records_so_far(workdir)), default=0)
        target = before + rng.randint(1, 2)  # a step the killed runs had not reached
        delay = rng.uniform(0.0, 0.3)  # then somewhere inside the next step
        proc = _start(repo_root, workdir, *longer)
        _wait_for(
            proc,
            lambda: (workdir / "metrics.jsonl").exists()
            and max((r["step"] for r in _records_so_far(workdir)), default=0) >= target,
            f"step {target}",
        )
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        kill_points.append((target, round(delay, 3)))
        # What a kill leaves: TensorBoard holds every record but at most the one being
        # written when the process died (no two-minute buffer).
        records = _records_so_far(workdir)
        tb = _tensorboard_scalars(workdir, complete=False)
        for tag, points in _jsonl_scalars(records).items():
            assert tb.get(tag, []) in (points, points[:-1]), (kill_points, tag)

    _ok(_train(repo_root, workdir, *longer))
    records = _records(workdir)
    assert [r["step"] for r in records] == list(range(1, 13))
    tb = _tensorboard_scalars(workdir)
    want = _jsonl_scalars(records)
    assert {tag: len(points) for tag, points in tb.items()} == {
        tag: len(points) for tag, points in want.items()
    }, kill_points
    assert tb == want, kill_points
    assert len(want["loss"]) == 12 and len(want["eval_loss"]) == 2


@pytest.mark.slow
def test_changed_shape_resume_is_a_short_error_and_changes_nothing(
    tmp_path, repo_root, stopped_at_4
):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_at_4, workdir)
    before = _snapshot(workdir)
    config_bytes = (workdir / "config.json").read_bytes()

    r = _train(repo_root, workdir, "--config.model.hidden_dim=48")
    assert r.returncode == 1, r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    assert "model.hidden_dim: 32 in the run, 48 now" in r.stderr, r.stderr[-4000:]
    error = r.stderr[r.stderr.index("error:") :].strip().splitlines()
    assert len(error) <= 6, error
    assert (workdir / "config.json").read_bytes() == config_bytes
    assert _snapshot(workdir) == before  # checkpoints, metrics, TensorBoard untouched
    assert not (workdir / "checkpoints_quarantine").exists()


@pytest.mark.slow
def test_finished_run_rerun_says_so_and_changes_nothing(tmp_path, repo_root, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    before = _snapshot(workdir)
    # The same command, then one with a changed learning rate: nothing is left to
    # run, so nothing (config.json included) may change.
    for extra in [(), ("--config.optim.lr=5e-4",)]:
        r = _train(repo_root, workdir, *extra)
        _ok(r)
        assert f"The run in {workdir} finished at step 7; nothing to do." in r.stdout
        assert "final metrics: {}" not in r.stdout
        assert "final metrics: {'step': 7," in r.stdout
        assert _snapshot(workdir) == before, extra


# ------------------------------------------------------------------ unit (in-process)


def _tree(mesh, seed=0):
    """A small state on `mesh`: float32 sharded two ways (8 KiB shards, stored outside
    the OCDBT B-tree), bfloat16, int32 replicated."""
    rng = np.random.default_rng(seed)
    values = {
        "w": rng.standard_normal((256, 64)).astype(np.float32),
        "b": rng.standard_normal((8, 4)).astype(jnp.bfloat16),
        "count": np.arange(8, dtype=np.int32) + seed,
    }
    specs = {"w": P(("data", "fsdp"), "tensor"), "b": P(None, "tensor"), "count": P()}
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def mesh():
    return mesh_lib.make_mesh((8, 1, 1))


def _checkpointer(tmp_path, **options):
    return checkpointing.Checkpointer(str(tmp_path / "ckpt"), **options)


def _saved(tmp_path, mesh, steps):
    """A Checkpointer holding item "state" at each of `steps` (tree seeded by the step)."""
    ckpt = _checkpointer(tmp_path)
    for step in steps:
        ckpt.save(step, {"state": _tree(mesh, step)}, {"data": {"index": step}}, force=True)
    ckpt.wait()
    return ckpt


def test_steps_only_rise(tmp_path, mesh):
    ckpt = _saved(tmp_path, mesh, [3])
    for step in (3, 2):
        with pytest.raises(ValueError, match=f"step {step} is not above the latest saved step 3"):
            ckpt.save(step, {"state": _tree(mesh)}, {}, force=True)
    assert ckpt.save(4, {"state": _tree(mesh)}, {}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    ckpt.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_state_is_named_and_nothing_is_written(tmp_path, mesh, bad):
    tree = _tree(mesh)
    tree["w"] = tree["w"].at[5, 3].set(bad)
    ckpt = _checkpointer(tmp_path)
    with pytest.raises(checkpointing.NonFiniteStateError) as info:
        ckpt.save(1, {"policy.params": tree}, {"data": {}}, force=True)
    message = str(info.value)
    assert "Step 1" in message and "'policy.params'" in message and "['w']" in message
    assert "['b']" not in message and "['count']" not in message
    ckpt.wait()
    assert ckpt.all_steps() == []
    assert os.listdir(tmp_path / "ckpt") == []  # not even a temporary directory
    ckpt.close()


def test_incompatible_target_is_named_and_the_checkpoint_left_alone(tmp_path, mesh):
    ckpt = _saved(tmp_path, mesh, [1])
    before = _snapshot(tmp_path / "ckpt")
    target = _abstract(_tree(mesh))
    target["w"] = jax.ShapeDtypeStruct((256, 32), jnp.float32, sharding=target["w"].sharding)
    with pytest.raises(checkpointing.IncompatibleCheckpointError) as info:
        ckpt.restore({"state": target})
    message = str(info.value)
    assert "['w']: checkpoint float32[256, 64], run float32[256, 32]" in message
    assert "['b']" not in message
    assert not (tmp_path / "ckpt_quarantine").exists()
    assert ckpt.all_steps() == [1] and _snapshot(tmp_path / "ckpt") == before
    items, _, step = ckpt.restore({"state": _abstract(_tree(mesh))})  # still intact
    assert step == 1
    _assert_tree_equal(items["state"], _tree(mesh, 1))
    ckpt.close()


def test_explicit_step_raises_instead_of_falling_back(tmp_path, mesh):
    ckpt = _saved(tmp_path, mesh, [1, 2])
    _rewrite_checksum(tmp_path / "ckpt" / "2", "state")
    with pytest.raises(checkpointing.CorruptCheckpointError, match="do not match their checksums"):
        ckpt.restore({"state": _abstract(_tree(mesh))}, step=2)
    assert ckpt.all_steps() == [1, 2]
    assert not (tmp_path / "ckpt_quarantine").exists()
    ckpt.close()


def _swap_in_older_values(tmp_path):
    """Step 2's arrays replaced by step 1's, files and all: it decodes perfectly, to
    the wrong values (only the checksums recorded with step 2 can tell)."""
    item = tmp_path / "ckpt" / "2" / "state"
    shutil.rmtree(item)
    shutil.copytree(tmp_path / "ckpt" / "1" / "state", item)


SILENT = {
    "stored_checksum": lambda tmp_path: _rewrite_checksum(tmp_path / "ckpt" / "2", "state"),
    "consistent_values": _swap_in_older_values,
}
INDEX = {"index_bit_flip": _flip_a_bit_in_the_index}


@pytest.mark.parametrize("damage", sorted(SILENT) + sorted(DAMAGE) + sorted(INDEX))
def test_damaged_newest_is_quarantined_and_the_previous_restored(
    tmp_path, mesh, caplog, monkeypatch, damage
):
    ckpt = _saved(tmp_path, mesh, [1, 2])
    if damage in SILENT:
        SILENT[damage](tmp_path)
    else:
        {**DAMAGE, **INDEX}[damage](tmp_path / "ckpt" / "2" / "state")
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with caplog.at_level(logging.WARNING, logger="rl_reason.checkpointing"):
        items, progress, step = ckpt.restore({"state": _abstract(_tree(mesh))})
    # The reads still in flight when one failed end on TensorStore's threads; none
    # may print a traceback ("Event loop is closed") after the one-line warning.
    time.sleep(0.5)
    assert [str(u.exc_value) for u in unraisable] == []
    assert step == 1 and progress == {"data": {"index": 1}}
    _assert_tree_equal(items["state"], _tree(mesh, 1))
    assert ckpt.all_steps() == [1]
    assert re.search(r"Checkpoint 2 in \S+ is damaged: ", caplog.text), caplog.text
    moved = [p for p in (tmp_path / "ckpt_quarantine").iterdir() if p.is_dir()]
    assert [p.name.split(".")[0] for p in moved] == ["2"]
    assert (moved[0] / "state").is_dir()
    reason = (tmp_path / "ckpt_quarantine" / f"{moved[0].name}.reason.txt").read_text()
    if damage == "stored_checksum":
        assert "item 'state': 1 array(s) do not match their checksums, e.g. ['b']" in reason, reason
    elif damage == "consistent_values":
        assert "item 'state': 3 array(s) do not match their checksums" in reason, reason
    elif damage == "bit_flip" and "checksums" in reason:  # it decoded, to another value
        assert "item 'state': 1 array(s) do not match their checksums, e.g. ['w']" in reason, reason
    elif damage == "bit_flip" and "NaN" in reason:  # it decoded, to NaN or inf
        assert "item 'state' reads back with NaN or inf" in reason, reason
    else:  # a read error (for a bit flip: zstd could not decode the chunk), in one line
        # naming the file, without TensorStore's spec
        assert reason.startswith("its arrays do not read (ValueError: "), reason
        assert f'local file "{tmp_path / "ckpt" / "2" / "state"}/' in reason, reason
        assert "tensorstore_spec" not in reason and "bound method" not in reason, reason
    # The next save goes on from the restored step.
    assert ckpt.save(2, {"state": _tree(mesh, 2)}, {}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


def test_checksums_do_not_depend_on_the_mesh(tmp_path):
    mesh_a = mesh_lib.make_mesh((8, 1, 1))
    mesh_b = mesh_lib.make_mesh((1, 4, 2))
    tree_a, tree_b = _tree(mesh_a), _tree(mesh_b)
    assert tree_a["w"].sharding != tree_b["w"].sharding
    single = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), tree_a)
    sums = checkpointing.describe(tree_a)["checksums"]
    assert checkpointing.describe(tree_b)["checksums"] == sums
    assert checkpointing.describe(single)["checksums"] == sums
    # ... but they do depend on where each value is: swap two elements of w.
    w = tree_a["w"]
    swapped = dict(tree_a, w=w.at[0, 0].set(w[0, 1]).at[0, 1].set(w[0, 0]))
    assert checkpointing.describe(swapped)["checksums"][2] != sums[2]  # leaves sort: b, count, w
    # Saved on one mesh, restored (and verified) on the other.
    ckpt = _checkpointer(tmp_path)
    ckpt.save(1, {"state": tree_a}, {}, force=True)
    ckpt.wait()
    items, _, _ = ckpt.restore({"state": _abstract(tree_b)})
    assert items["state"]["w"].sharding == tree_b["w"].sharding
    _assert_tree_equal(items["state"], tree_a)
    ckpt.close()


def test_metric_writer_event_file_holds_each_record_once_written(tmp_path):
    """What a SIGKILL leaves on disk, read while the writer is still open: every
    record written so far, in metrics.jsonl and in TensorBoard alike."""
    writer = run_logging.MetricWriter(str(tmp_path), tensorboard=True)
    for step in range(1, 4):
        writer.write(step, {"loss": np.float32(1.0 / step), "lr": 0.5})
        records = _records(tmp_path)
        assert _tensorboard_scalars(tmp_path) == _jsonl_scalars(records), step
    writer.close()


def test_metric_writer_resume_rebuilds_tensorboard_from_metrics(tmp_path):
    writer = run_logging.MetricWriter(str(tmp_path), tensorboard=True)
    for step in range(1, 6):
        writer.write(step, {"loss": 1.0 / step, "bad": float("nan")})
    writer.close()
    # Resumed from a checkpoint at step 3: records 4 and 5 are redone.
    writer = run_logging.MetricWriter(str(tmp_path), tensorboard=True, resume_step=3)
    writer.write(4, {"loss": 0.3})
    writer.close()
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["bad"] == "nan"  # kept visible in metrics.jsonl, not a TensorBoard point
    assert _tensorboard_scalars(tmp_path) == _jsonl_scalars(records)
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_a_run_whose_every_checkpoint_is_damaged_is_not_started_over(tmp_path, mesh):
    from rl_reason.experiments import runs

    workdir = tmp_path / "run"
    ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
    ckpt.save(1, {"state": _tree(mesh, 1)}, {}, force=True)
    ckpt.wait()
    ckpt.quarantine(1, "damaged, for the test")
    ckpt.close()
    config = config_lib.base_config()
    with pytest.raises(checkpointing.CorruptCheckpointError, match="Every checkpoint of the run"):
        runs.make_checkpointer(config, str(workdir))
    assert [p.name.split(".")[0] for p in (workdir / "checkpoints_quarantine").iterdir()
            if p.is_dir()] == ["1"]  # kept


def _failed_task_dropped_unretrieved(filename: str) -> None:
    """Runs a task whose coroutine, compiled as if it lived in `filename`, fails;
    then drops the task with its exception never retrieved, as a restore whose
    loop closed on another array's error drops its other reads."""
    namespace: dict = {}
    exec(compile("async def read():\n    raise ValueError('NOT_FOUND')\n", filename, "exec"),
         namespace)
    loop = asyncio.new_event_loop()
    task = loop.create_task(namespace["read"]())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    del task
    gc.collect()


def test_an_abandoned_failed_orbax_read_is_not_reported_but_other_tasks_are(caplog):
    checkpointing._drop_echoes_of_a_failed_read()
    orbax_file = os.path.join(os.sep, "site", "orbax", "checkpoint", "serialization.py")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _failed_task_dropped_unretrieved(orbax_file)
        assert "never retrieved" not in caplog.text
        _failed_task_dropped_unretrieved(os.path.join(os.sep, "site", "mine", "reader.py"))
        assert "Task exception was never retrieved" in caplog.text
        assert "NOT_FOUND" in caplog.text

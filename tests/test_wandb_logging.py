"""The optional Weights & Biases backend: metrics.jsonl mirrored into an offline W&B
run, rebuilt on resume as TensorBoard's events are (no JAX training here)."""

import glob
import json
import pathlib
import struct
import sys
import time

import pytest

from rl_reason import logging as run_logging

wandb = pytest.importorskip("wandb")


def _wandb_records(path):
    """The protobuf records of a .wandb file (W&B's LevelDB-style log: a 7-byte header,
    then 32 KiB blocks of chunks, each with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 7:  # not yet written
        return
    assert data[:4] == b":W&B"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # the block's zero padding
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def _finished_records(run_file, timeout=60.0):
    """The run's records once its file holds the exit record: W&B's service process
    writes the file and may still be at it when `finish` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{run_file} has no exit record"
        time.sleep(0.2)


def _wandb_history(workdir):
    """{step: {key: value}} of the workdir's one offline W&B run."""
    (run_file,) = glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = {}
    for record in _finished_records(run_file):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {
            item.key or ".".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
        }
        step = items.pop("_step")
        history.setdefault(step, {}).update(
            {k: v for k, v in items.items() if not k.startswith("_")}
        )
    return history


def _jsonl_points(workdir):
    return {
        record["step"]: run_logging.scalar_points(record)
        for record in run_logging.read_metrics(str(workdir))
    }


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _writer(workdir, **kwargs):
    return run_logging.MetricWriter(
        str(workdir), tensorboard=True, backends=("wandb",), wandb={"project": "t"}, **kwargs
    )


def test_wandb_run_holds_metrics_jsonl_and_a_resume_rebuilds_it(tmp_path, offline):
    writer = _writer(tmp_path)
    for step in range(1, 6):
        writer.write(
            step, {"loss": 1.0 / step, "heldout/maj1": 0.5, "bad": float("nan"), "ok": True}
        )
    writer.close()
    first = json.loads((tmp_path / "wandb_run.json").read_text())
    history = _wandb_history(tmp_path)
    assert history == _jsonl_points(tmp_path)
    assert sorted(history) == [1, 2, 3, 4, 5] and history[2] == {"loss": 0.5, "heldout/maj1": 0.5}

    # Resumed from a checkpoint at step 3: records 4 and 5 are redone, with new values.
    writer = _writer(tmp_path, resume_step=3)
    writer.write(4, {"loss": 0.3})
    writer.close()
    assert [r["step"] for r in run_logging.read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    history = _wandb_history(tmp_path)  # one offline run in the workdir: the rebuilt one
    assert history == _jsonl_points(tmp_path)
    assert history[4] == {"loss": 0.3} and 5 not in history
    attempts = json.loads((tmp_path / "wandb_run.json").read_text())
    assert attempts["superseded"] == [first["current"]] != [attempts["current"]]


def test_wandb_backend_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        _writer(tmp_path)


def test_unknown_backend_fails_before_the_run_starts(tmp_path):
    from rl_reason.experiments import config as config_lib

    with pytest.raises(ValueError, match="known backends"):
        run_logging.MetricWriter(str(tmp_path), backends=("mlflow",))
    config = config_lib.base_config()
    config.logging.backends = ("wandb", "mlflow")
    with pytest.raises(ValueError, match="mlflow"):
        config_lib.validate(config, num_devices=1)
    config.logging.backends = ("wandb",)
    config_lib.validate(config, num_devices=1)


def test_a_report_goes_to_wandb_with_its_table_plots_and_text(tmp_path, offline):
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "pass_at_k.png", dpi=20)
    plt.close(fig)
    (tmp_path / "report.md").write_text("# The study in miniature\n")
    run_id = run_logging.wandb_report(
        str(tmp_path),
        {"project": "t"},
        table=(["start", "maj@1"], [["sft", "68.0"], ["pretrained", "15.6"]]),
        images=[str(tmp_path / "pass_at_k.png")],
        files=[str(tmp_path / "report.md")],
    )
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))
    (run_file,) = glob.glob(f"{run_dir}/run-*.wandb")
    logged = {}  # {key: value}, a media value as {field: value} (W&B's nested keys)
    for record in _finished_records(run_file):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key, *field = [item.key] if item.key else list(item.nested_key)
                value = json.loads(item.value_json)
                if field:
                    logged.setdefault(key, {})[field[0]] = value
                else:
                    logged[key] = value
    assert logged["results"]["_type"] == "table-file" and logged["results"]["nrows"] == 2
    assert logged["pass_at_k"]["_type"] == "image-file"
    assert (
        pathlib.Path(run_dir) / "files" / "report.md"
    ).read_text() == "# The study in miniature\n"

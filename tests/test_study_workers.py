"""The study's stages side by side (experiments/study_workers.py), on stand-in stages.

Each worker process runs on one CPU; a stage starts only after the stages it needs
finished; a stage's config crosses the pipe as it was; a failure is named and stops
the others, which save; a signal to the job saves every running stage; a worker that
dies is a failure. The real stages run through the pool in the slow tier's study test.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import ml_collections
import pytest

from configs import study_mini
from rl_reason import checkpointing
from rl_reason.experiments import runs, study_plan, study_workers
from rl_reason.experiments.study_plan import Stage

FAKES = ("study_fakes", "run_stage")


@pytest.fixture(autouse=True)
def _fakes_importable(monkeypatch):
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))


def _stage(name, act="sleep", seconds=0.0, needs=(), kind="train", partner=""):
    config = ml_collections.ConfigDict(
        {"act": act, "seconds": seconds, "buckets": (64, 128), "partner": partner}
    )
    return Stage(name, kind, config, f"the stand-in {name}", needs=tuple(needs))


def _record(workdir, name):
    with open(os.path.join(workdir, name, "fake.json")) as f:
        return json.load(f)


def _run(stages, workdir, workers=2):
    """(the pool's events in order: ("start" | "done", name), {name: metrics})."""
    events, done = [], {}

    def finished(stage, metrics, seconds):
        events.append(("done", stage.name))
        done[stage.name] = metrics

    pool = study_workers.StagePool(workers, run_stage=FAKES)
    pool.run(stages, str(workdir), lambda s: events.append(("start", s.name)), finished)
    return events, done


def test_stages_run_side_by_side_after_what_they_need_each_on_one_cpu(tmp_path):
    stages = [
        _stage("a", "meet", partner="b"),  # each waits until the other has begun
        _stage("b", "meet", partner="a"),
        _stage("eval-a", seconds=0.2, needs=("a",), kind="evaluate"),
        _stage("c", seconds=0.2, needs=("a", "b")),
        _stage("d", seconds=0.2, needs=("gone",)),  # finished before this run: not waited for
    ]
    events, done = _run(stages, tmp_path)
    assert sorted(done) == sorted(s.name for s in stages)
    assert done["c"] == {"kind": "train", "buckets": "tuple", "seconds": 0.2}  # as sent
    # Training stages go first among the ready ones: the evaluation started before c only
    # if c was still waiting for b then.
    before_eval = events[: events.index(("start", "eval-a"))]
    assert ("start", "c") in before_eval or ("done", "b") not in before_eval
    records = {s.name: _record(tmp_path, s.name) for s in stages}
    for stage in stages:
        for need in stage.needs:
            if need in records:
                assert records[need]["ended"] <= records[stage.name]["began"], stage.name
        assert len(records[stage.name]["cpus"]) == 1
    # a and b ran at once (each waited for the other), in two processes pinned to
    # different CPUs where there are two.
    assert records["a"]["pid"] != records["b"]["pid"]
    if len(os.sched_getaffinity(0)) > 1:
        assert records["a"]["cpus"] != records["b"]["cpus"]


def test_a_failing_stage_is_named_and_the_others_save_and_stop(tmp_path):
    stages = [_stage("long", "wait_for_signal"), _stage("broken", "fail", seconds=0.5),
              _stage("later", needs=("broken",))]  # fmt: skip
    with pytest.raises(study_workers.StageFailedError, match="stage broken failed: ValueError") as e:
        _run(stages, tmp_path)
    assert "a bug in the stage" in e.value.details and "Traceback" in e.value.details
    assert _record(tmp_path, "long")["how"] == "preempted"
    assert not (tmp_path / "later").exists()


def test_a_users_error_comes_without_traceback(tmp_path):
    with pytest.raises(study_workers.StageFailedError, match="InvalidConfigError") as e:
        _run([_stage("bad", "config_error")], tmp_path, workers=1)
    assert e.value.details == ""


def test_a_worker_that_dies_is_a_failure(tmp_path):
    with pytest.raises(study_workers.StageFailedError, match="WorkerDied.*status 3"):
        _run([_stage("dies", "die")], tmp_path, workers=1)


def test_a_signal_to_the_job_saves_every_running_stage_and_starts_no_other(tmp_path):
    stages = [_stage("one", "wait_for_signal"), _stage("two", "wait_for_signal"),
              _stage("after", needs=("one",))]  # fmt: skip

    def signal_when_both_run():
        for _ in range(600):
            if all((tmp_path / n).exists() for n in ("one", "two")):
                break
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_both_run, daemon=True).start()
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(checkpointing.Preempted):
        _run(stages, tmp_path)
    assert signal.getsignal(signal.SIGTERM) is previous  # the pool's handler is gone
    assert _record(tmp_path, "one")["how"] == _record(tmp_path, "two")["how"] == "preempted"
    assert not (tmp_path / "after").exists()


def test_pretraining_leads_and_every_stage_needs_the_models_it_reads(tmp_path):
    plan = study_plan.stages(study_mini.get_config(), str(tmp_path))
    by_name = {s.name: s for s in plan}
    assert [s.name for s in study_workers.leading_stages(plan)] == ["pretrain"]
    assert study_workers.leading_stages(plan[1:]) == []  # the pretrained runs need no SFT
    for stage in plan:
        paths = [stage.config.get("model_source", {}).get("path", "")]
        paths += [stage.config.get("eval", {}).get("orm_source", "")]
        paths += [stage.config.get("rl", {}).get("orm_source", "")]
        read = {os.path.basename(p) for p in paths if p}
        assert read == set(stage.needs), stage.name
        assert all(plan.index(by_name[n]) < plan.index(stage) for n in stage.needs)


def test_a_stage_config_crosses_the_pipe_as_it_was(tmp_path):
    for stage in study_plan.stages(study_mini.get_config(), str(tmp_path)):
        sent = json.loads(json.dumps(study_workers.encode(stage.config)))
        back = study_workers.decode(sent)
        assert runs.config_dict(back) == runs.config_dict(stage.config)
        assert back.to_dict() == stage.config.to_dict()  # tuples stay tuples


def test_the_number_of_workers():
    assert study_workers.default_workers(3) == 3
    assert study_workers.default_workers(0) == len(os.sched_getaffinity(0))  # a CPU host
    with pytest.raises(ValueError, match="study.workers is -1"):
        study_workers.default_workers(-1)


def test_the_launcher_reports_a_failed_stage_in_one_paragraph_after_its_traceback(capsys):
    from rl_reason.experiments import cli

    def fails(details):
        raise study_workers.StageFailedError("sft", "ValueError", "a bug", details)

    for details in ("Traceback (most recent call last): ...", ""):
        with pytest.raises(SystemExit) as e:
            cli.run_reporting_errors(fails, details)
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err.endswith("error: stage sft failed: ValueError: a bug\n")
        assert ("Traceback" in err) == bool(details)

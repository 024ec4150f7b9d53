"""The study in miniature: both starting points, the algorithms and rewards, one report.

    python launch/train.py                      # configs/study_mini.py, in runs/default
    python launch/train.py --config=configs/study.py --workdir=runs/study

Havrilla et al. (2024) compare Expert Iteration, PPO and Return-Conditioned
RL from a pretrained and an SFT model, with sparse, dense and ORM rewards,
by maj@1, maj@K, rerank@K and pass@K against the samples each drew. This
job runs that grid as a sequence of stages, each an ordinary run of this
framework in a directory of its own under the workdir:

    pretrain        a small model trained from scratch on arithmetic text that
                    is not the task's solutions (`synthetic.pretraining_corpus`)
    sft             that model fine-tuned on the reference solutions
    orm             an outcome reward model on the SFT model's samples
    eval-<start>    both starts evaluated on the held-out questions
    <start>-<algorithm>-<reward>[-seed<n>]
                    each RL run of `study.runs`, from its start, and then
    eval-<that run> its evaluation: greedy maj@1, maj@K, rerank@K by the
                    ORM, pass@k for every k of `stages.eval.eval.ks`

and then writes `report.md`, its plots and `study.json`
(`study_report.write_report`). Every stage is resumable on its own, and a
finished stage leaves `stage.json` (its config and final metrics), so a
killed job rerun with the same command skips what is done, resumes the
stage it was in, and ends with the same report. On a CPU host the stages
after pretraining run side by side, one worker process per CPU, each
stage as soon as the stages it reads have finished (`study.workers`,
`study_workers.py`).

The config holds one template per kind of stage (`stages.pretrain`,
`stages.sft`, `stages.orm`, `stages.ei`, `stages.ppo`, `stages.rcrl`,
`stages.eval`: complete run configs, each overridable from the command line
like any other) and the grid (`study.runs`, `study.seeds`);
`study_plan.stages` fills in the paths that join them and the reward
variants, and this module runs what it lists.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import jax
import ml_collections
import tqdm

from rl_reason import checkpointing
from rl_reason.experiments import registry, runs, study_report, study_workers
from rl_reason.experiments.study_plan import Stage, stages

STAGE_RECORD = "stage.json"  # a finished stage's config and final metrics


def stage_record(workdir: str, stage: Stage) -> dict[str, Any] | None:
    """What a finished stage recorded, when it finished under the config it has now
    (None otherwise: the stage runs, and its own checkpoints say what is left)."""
    path = os.path.join(workdir, stage.name, STAGE_RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except ValueError:  # unreadable: running the stage again rewrites it
        return None
    return record if record.get("config") == runs.config_dict(stage.config) else None


def run_stage(kind: str, config: ml_collections.ConfigDict, directory: str) -> dict[str, Any]:
    """One stage (a plan's `Stage.kind` and `config`) in `directory`: its final metrics."""
    if kind == "evaluate":
        from rl_reason.experiments import evaluate

        return evaluate.run(config, directory)
    return registry.trainer(config)(config, directory)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) every stage not yet finished, then writes the report.

    Returns {row label: held-out maj@1}. A preemption signal inside
    a stage saves that stage and exits with status 75, like any run.
    """
    began = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    plan = stages(config, workdir)
    lead = jax.process_index() == 0  # every process runs each stage; one writes the records
    if lead:
        checkpointing.write_json_atomic(
            os.path.join(workdir, "config.json"), runs.config_dict(config)
        )
    timings_path = os.path.join(workdir, "timings.json")
    timings = {}
    if os.path.exists(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)
    quiet = not config.logging.progress_bar or not lead
    bar = tqdm.tqdm(total=len(plan), desc="study", unit="stage", disable=quiet, position=0)
    say = (print if quiet else tqdm.tqdm.write) if lead else (lambda line: None)
    ticking = threading.Event()  # the bar's clock moves while a stage runs
    if not quiet:
        threading.Thread(target=_tick, args=(bar, ticking), daemon=True).start()
    index = {stage.name: i for i, stage in enumerate(plan, 1)}
    head = lambda stage: f"[{index[stage.name]}/{len(plan)}] {stage.name}: {stage.description}"

    def started(stage: Stage) -> None:
        say(f"{head(stage)} ...")

    def finished(stage: Stage, metrics: dict[str, Any], seconds: float) -> None:
        record = {"config": runs.config_dict(stage.config), "metrics": metrics}
        timings[stage.name] = timings.get(stage.name, 0.0) + seconds
        if lead:
            path = os.path.join(workdir, stage.name, STAGE_RECORD)
            checkpointing.write_json_atomic(path, record)
            checkpointing.write_json_atomic(timings_path, timings)
        say(f"{head(stage)}: done in {seconds:.0f} s; {study_report.summary(stage, record)}")
        bar.update(1)

    pending = []
    for stage in plan:
        record = stage_record(workdir, stage)
        if record is None:
            pending.append(stage)
        else:
            say(f"{head(stage)}: done before; {study_report.summary(stage, record)}")
            bar.update(1)
    workers = study_workers.default_workers(config.study.workers)
    # Stages nothing can run beside (pretraining) run here, on every CPU; with one worker,
    # every stage does (the job as it ran before workers: its numbers are that job's).
    here = pending if workers <= 1 else study_workers.leading_stages(pending)
    for stage in here:
        bar.set_postfix_str(stage.name)
        started(stage)
        stage_began = time.perf_counter()
        metrics = run_stage(stage.kind, stage.config, os.path.join(workdir, stage.name))
        finished(stage, metrics, time.perf_counter() - stage_began)
    rest = pending[len(here) :]
    if rest:
        bar.set_postfix_str(f"{min(workers, len(rest))} workers")
        study_workers.StagePool(workers).run(rest, workdir, started, finished)
    ticking.set()
    bar.close()
    if not lead:
        return {}
    rows = study_report.write_report(config, workdir, plan)
    print(study_report.terminal_table(rows, config))
    clock = (time.perf_counter() - began) / 60  # side by side, less than the stages' sum
    print(
        f"report: {os.path.join(workdir, 'report.md')} (stages took"
        f" {sum(timings.values()) / 60:.1f} min in all; this run {clock:.1f} min on the clock,"
        f" {workers} worker{'s' if workers > 1 else ''})"
    )
    if "wandb" in config.logging.get("backends", ()):  # the report's table and plots too
        study_report.log_to_wandb(config, workdir, rows)
    return {row.label: metrics["maj@1"] for row, metrics in rows}


def _tick(bar: tqdm.tqdm, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        bar.refresh()

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
stage it was in, and ends with the same report.

The config holds one template per kind of stage (`stages.pretrain`,
`stages.sft`, `stages.orm`, `stages.ei`, `stages.ppo`, `stages.rcrl`,
`stages.eval`: complete run configs, each overridable from the command line
like any other) and the grid (`study.runs`, `study.seeds`); this module
fills in the paths that join them and the reward variants.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import tqdm

from rl_reason import checkpointing
from rl_reason.experiments import registry, runs

STARTS = ("pretrained", "sft")
ALGORITHMS = ("ei", "ppo", "grpo", "rcrl")
REWARDS = ("sparse", "dense", "orm")
# Which reward variants each algorithm has: EI filters on the sparse outcome
# (as in the study); PPO/GRPO's dense reward is `study.dense_rewards` (the
# study's step-match heuristic beside correctness) and its ORM reward the
# ORM's score of the whole sample; RCRL's dense variant labels every step
# with its own return token.
VARIANTS = {
    "ei": ("sparse",),
    "ppo": REWARDS,
    "grpo": REWARDS,
    "rcrl": ("sparse", "dense"),
}
# The template each algorithm's runs are made from, and the section its K lives in.
TEMPLATES = {"ei": "ei", "ppo": "ppo", "grpo": "ppo", "rcrl": "rcrl"}
STAGE_RECORD = "stage.json"
START_DIRS = {"pretrained": "pretrain", "sft": "sft"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the study's table: a start model, or an RL run from one."""

    start: str
    algorithm: str = ""  # "" for the start model itself
    reward: str = ""
    seed: int = 0

    @property
    def label(self) -> str:
        if not self.algorithm:
            return f"{self.start} (start)"
        return f"{self.start} / {self.algorithm.upper()} / {self.reward}"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # its directory under the workdir
    kind: str  # "train" or "evaluate"
    config: ml_collections.ConfigDict
    description: str
    row: Row | None = None  # the table row an evaluation stage fills
    trains: str = ""  # for an evaluation, the stage whose model it evaluates


def parse_run(spec: str) -> tuple[str, str, str]:
    """'sft:ppo:dense' -> ('sft', 'ppo', 'dense'); ValueError naming what is wrong."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError(f"study.runs entry {spec!r} is not 'start:algorithm:reward'.")
    start, algorithm, reward = parts
    if start not in STARTS:
        raise ValueError(f"study.runs entry {spec!r}: start {start!r} not in {STARTS}.")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"study.runs entry {spec!r}: algorithm {algorithm!r} not in {ALGORITHMS}.")
    if reward not in VARIANTS[algorithm]:
        raise ValueError(
            f"study.runs entry {spec!r}: {algorithm} has the rewards {VARIANTS[algorithm]}."
        )
    return start, algorithm, reward


def run_name(row: Row, seeds: Sequence[int]) -> str:
    name = f"{row.start}-{row.algorithm}-{row.reward}"
    return f"{name}-seed{row.seed}" if len(seeds) > 1 else name


def _copy(template: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config = template.copy_and_resolve_references()
    config.unlock()
    return config


def _from(template: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
    config = _copy(template)
    config.model_source.kind = "run"
    config.model_source.path = path
    return config


def _rl_config(config, algorithm: str, reward: str, seed: int, start_path: str, orm_path: str):
    stage = _from(config.stages[TEMPLATES[algorithm]], start_path)
    stage.seed = seed
    if algorithm == "grpo":  # the PPO template with a group baseline and no value
        stage.algorithm = "grpo"
        stage.rl.advantage = "grpo"
        stage.ppo.use_value = False
    if reward == "dense":
        if algorithm == "rcrl":
            stage.rcrl.mode = "dense"
        else:
            stage.rl.rewards = ml_collections.ConfigDict(config.study.dense_rewards.to_dict())
    if reward == "orm":
        stage.rl.rewards = ml_collections.ConfigDict({"orm_outcome": 1.0})
        stage.rl.orm_source = orm_path
    return stage


def _eval_config(config, model_path: str, orm_path: str) -> ml_collections.ConfigDict:
    stage = _from(config.stages.eval, model_path)
    stage.eval.orm_source = orm_path if config.study.rerank else ""
    return stage


def stages(config: ml_collections.ConfigDict, workdir: str) -> list[Stage]:
    """Every stage of the study, in the order they run, with its complete config."""
    seeds = tuple(config.study.seeds)
    if not seeds:
        raise ValueError("study.seeds is empty: give at least one seed.")
    specs = [parse_run(spec) for spec in config.study.runs]
    path = lambda name: os.path.join(workdir, name)  # noqa: E731
    pretrain = _copy(config.stages.pretrain)
    sft = _from(config.stages.sft, path("pretrain"))
    orm = _from(config.stages.orm, path("sft"))
    out = [
        Stage("pretrain", "train", pretrain, "pretraining on arithmetic text"),
        Stage("sft", "train", sft, "SFT of the pretrained model on the reference solutions"),
    ]
    if config.study.rerank or any(reward == "orm" for _, _, reward in specs):
        what = "the outcome reward model on the SFT model's samples"
        out.append(Stage("orm", "train", orm, what))
    for start in STARTS:  # both, always: the table's first finding is the gap between them
        out.append(
            Stage(
                f"eval-{start}",
                "evaluate",
                _eval_config(config, path(START_DIRS[start]), path("orm")),
                f"evaluation of the {start} start",
                row=Row(start),
                trains=START_DIRS[start],
            )
        )
    for start, algorithm, reward in specs:
        for seed in seeds:
            row = Row(start, algorithm, reward, seed)
            name = run_name(row, seeds)
            rl = _rl_config(
                config, algorithm, reward, seed, path(START_DIRS[start]), path("orm")
            )
            what = f"{algorithm.upper()} from the {start} model, {reward} reward"
            what += f", seed {seed}" if len(seeds) > 1 else ""
            out.append(Stage(name, "train", rl, what))
            out.append(
                Stage(
                    f"eval-{name}",
                    "evaluate",
                    _eval_config(config, path(name), path("orm")),
                    f"evaluation of {name}",
                    row=row,
                    trains=name,
                )
            )
    return out


def stage_record(workdir: str, stage: Stage) -> dict[str, Any] | None:
    """What a finished stage recorded, when it finished under the config it has now."""
    path = os.path.join(workdir, stage.name, STAGE_RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return record if record.get("config") == runs.config_dict(stage.config) else None


def _run_stage(stage: Stage, directory: str) -> dict[str, Any]:
    if stage.kind == "evaluate":
        from rl_reason.experiments import evaluate

        return evaluate.run(stage.config, directory)
    return registry.trainer(stage.config)(stage.config, directory)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) every stage not yet finished, then writes the report.

    Returns {row label: held-out maj@1}. A preemption signal inside
    a stage saves that stage and exits with status 75, like any run.
    """
    from rl_reason.experiments import study_report

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
    for index, stage in enumerate(plan, 1):
        head = f"[{index}/{len(plan)}] {stage.name}: {stage.description}"
        bar.set_postfix_str(stage.name)
        record = stage_record(workdir, stage)
        if record is None:
            say(f"{head} ...")
            began = time.perf_counter()
            metrics = _run_stage(stage, os.path.join(workdir, stage.name))
            seconds = time.perf_counter() - began
            record = {"config": runs.config_dict(stage.config), "metrics": _plain(metrics)}
            timings[stage.name] = timings.get(stage.name, 0.0) + seconds
            if lead:
                path = os.path.join(workdir, stage.name, STAGE_RECORD)
                checkpointing.write_json_atomic(path, record)
                checkpointing.write_json_atomic(timings_path, timings)
            say(f"{head}: done in {seconds:.0f} s; {study_report.summary(stage, record)}")
        else:
            say(f"{head}: done before; {study_report.summary(stage, record)}")
        bar.update(1)
    ticking.set()
    bar.close()
    if not lead:
        return {}
    rows = study_report.write_report(config, workdir, plan)
    print(study_report.terminal_table(rows, config))
    print(
        f"report: {os.path.join(workdir, 'report.md')} "
        f"(stages took {sum(timings.values()) / 60:.1f} min in all)"
    )
    return {row.label: metrics["maj@1"] for row, metrics in rows}


def _tick(bar: tqdm.tqdm, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        bar.refresh()


def _plain(metrics: Any) -> Any:
    """Metrics as JSON can hold them (numpy scalars to floats)."""
    if isinstance(metrics, dict):
        return {str(k): _plain(v) for k, v in metrics.items()}
    if isinstance(metrics, (list, tuple)):
        return [_plain(v) for v in metrics]
    if isinstance(metrics, (str, bool, int, float)) or metrics is None:
        return metrics
    try:
        return float(metrics)
    except (TypeError, ValueError):
        return str(metrics)

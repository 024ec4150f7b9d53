"""The study's plan: which stages run, in which order, each with its complete config.

`stages(config, workdir)` turns a study config (`study_config()`: a template
per kind of stage, the grid in `study.runs` x `study.seeds`) into the list
of stages `experiments/study.py` runs: it fills in the model paths that
join them, each RL run's seed and its reward variant, and nothing else
(the templates are copied, never changed).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import ml_collections

from rl_reason.experiments.config import InvalidConfigError

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
# The template (a key of the config's `stages`) each algorithm's runs are made from.
TEMPLATES = {"ei": "ei", "ppo": "ppo", "grpo": "ppo", "rcrl": "rcrl"}
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
    model_stage: str = ""  # for an evaluation, the stage whose model it evaluates
    needs: tuple[str, ...] = ()  # the stages whose models it reads (they finish first)


def parse_run(spec: str) -> tuple[str, str, str]:
    """'sft:ppo:dense' -> ('sft', 'ppo', 'dense'); InvalidConfigError naming what is wrong."""
    parts = spec.split(":")
    if len(parts) != 3:
        problem = "is not 'start:algorithm:reward'"
    else:
        start, algorithm, reward = parts
        if start not in STARTS:
            problem = f"start {start!r} not in {STARTS}"
        elif algorithm not in ALGORITHMS:
            problem = f"algorithm {algorithm!r} not in {ALGORITHMS}"
        elif reward not in VARIANTS[algorithm]:
            problem = f"{algorithm} has the rewards {VARIANTS[algorithm]}"
        else:
            return start, algorithm, reward
    raise InvalidConfigError([f"study.runs entry {spec!r}: {problem}."])


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
        raise InvalidConfigError(["study.seeds is empty: give at least one seed."])
    specs = [parse_run(spec) for spec in config.study.runs]
    path = lambda name: os.path.join(workdir, name)  # noqa: E731
    pretrain = _copy(config.stages.pretrain)
    sft = _from(config.stages.sft, path("pretrain"))
    orm = _from(config.stages.orm, path("sft"))
    reranked = ("orm",) if config.study.rerank else ()  # what an evaluation reads beside its model
    out = [
        Stage("pretrain", "train", pretrain, "pretraining on arithmetic text"),
        Stage(
            "sft",
            "train",
            sft,
            "SFT of the pretrained model on the reference solutions",
            needs=("pretrain",),
        ),
    ]
    if config.study.rerank or any(reward == "orm" for _, _, reward in specs):
        what = "the outcome reward model on the SFT model's samples"
        out.append(Stage("orm", "train", orm, what, needs=("sft",)))
    for start in STARTS:  # both, always: the table's first finding is the gap between them
        out.append(
            Stage(
                f"eval-{start}",
                "evaluate",
                _eval_config(config, path(START_DIRS[start]), path("orm")),
                f"evaluation of the {start} start",
                row=Row(start),
                model_stage=START_DIRS[start],
                needs=(START_DIRS[start], *reranked),
            )
        )
    for start, algorithm, reward in specs:
        for seed in seeds:
            row = Row(start, algorithm, reward, seed)
            name = run_name(row, seeds)
            rl = _rl_config(config, algorithm, reward, seed, path(START_DIRS[start]), path("orm"))
            what = f"{algorithm.upper()} from the {start} model, {reward} reward"
            what += f", seed {seed}" if len(seeds) > 1 else ""
            reads = (START_DIRS[start], *(("orm",) if reward == "orm" else ()))
            out.append(Stage(name, "train", rl, what, needs=reads))
            out.append(
                Stage(
                    f"eval-{name}",
                    "evaluate",
                    _eval_config(config, path(name), path("orm")),
                    f"evaluation of {name}",
                    row=row,
                    model_stage=name,
                    needs=(name, *reranked),
                )
            )
    return out

"""The questions an RL run trains on and the held-out ones it is measured on.

`data.task` names them: "synthetic" (the built-in arithmetic task, its train
and test splits), "gsm8k" (train / test) or "svamp" (one 1000-question set,
split by a fixed, recorded rule: questions whose index modulo 10 is below
`data.svamp_train_tenths` train, the rest are held out; 7 gives 700 / 300).
Every example is a dict with at least question, answer and final_answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from rl_reason.data import builders, synthetic


@dataclasses.dataclass
class Task:
    train: list[Mapping[str, Any]]
    heldout: list[Mapping[str, Any]]  # the test questions: final figures only
    # Taken from the end of the train questions (data.num_validation of them)
    # and removed from train: what Expert Iteration selects its checkpoints by.
    validation: list[Mapping[str, Any]] = dataclasses.field(default_factory=list)

    def with_validation(self, count: int) -> "Task":
        if count <= 0:
            return self
        if count >= len(self.train):
            raise ValueError(
                f"data.num_validation={count} leaves no train question of {len(self.train)}."
            )
        return Task(self.train[:-count], self.heldout, self.train[-count:])


def _read(config: ml_collections.ConfigDict, dataset: str, split: str) -> list[dict[str, str]]:
    rows = builders.data_source(
        dataset, split, data_dir=config.data.tfds_dir, manual_dir=config.data.manual_dir or None
    )
    return [builders.decode(row) for row in rows]


def load(config: ml_collections.ConfigDict) -> Task:
    return _load(config).with_validation(config.data.get("num_validation", 0))


def _load(config: ml_collections.ConfigDict) -> Task:
    task = config.data.task
    if config.data.get("bare_answer_fraction", 0.0) and task != "synthetic":
        raise ValueError(
            f"data.bare_answer_fraction rewrites synthetic solutions only; data.task={task!r}."
        )
    if task in ("synthetic", "synthetic_text"):
        difficulty = synthetic.Difficulty(
            config.data.min_steps, config.data.max_steps, config.data.max_operand
        )
    if task == "synthetic_text":
        texts = synthetic.pretraining_corpus(
            config.data.num_train + config.data.num_eval, seed=config.seed, difficulty=difficulty
        )
        documents = [{"text": text} for text in texts]
        return Task(documents[: config.data.num_train], documents[config.data.num_train :])
    if task == "synthetic":
        make = lambda split, n: synthetic.generate(
            split, n, seed=config.seed, difficulty=difficulty
        )
        train = make("train", config.data.num_train + config.data.get("num_validation", 0))
        if config.data.get("bare_answer_fraction", 0.0):
            train = synthetic.with_bare_answers(train, config.data.bare_answer_fraction)
        return Task(train, make("test", config.data.num_eval))
    if task == "gsm8k":
        return Task(_read(config, "gsm8k", "train"), _read(config, "gsm8k", "test"))
    if task == "svamp":
        rows = _read(config, "svamp", "test")
        tenths = config.data.svamp_train_tenths
        return Task(
            [r for i, r in enumerate(rows) if i % 10 < tenths],
            [r for i, r in enumerate(rows) if i % 10 >= tenths],
        )
    raise ValueError(f"data.task={task!r}; known: 'synthetic', 'synthetic_text', 'gsm8k', 'svamp'.")

"""Which loop trains a config: `config.algorithm` names it (SFT when absent)."""

from __future__ import annotations

import importlib
from typing import Any, Callable

import ml_collections

# algorithm -> module whose `train(config, workdir)` runs it; imported on demand.
TRAINERS = {
    "sft": "rl_reason.experiments.sft",
    "ppo": "rl_reason.experiments.on_policy",
    "grpo": "rl_reason.experiments.on_policy",
    # GRPO's relatives: the same on-policy learner, named so a run says which it is.
    "dapo": "rl_reason.experiments.on_policy",
    "gspo": "rl_reason.experiments.on_policy",
    "cispo": "rl_reason.experiments.on_policy",
    "reinforce_pp": "rl_reason.experiments.on_policy",
    "ei": "rl_reason.experiments.expert_iteration",
    "orm": "rl_reason.experiments.orm",
    "rcrl": "rl_reason.experiments.rcrl",
    "study": "rl_reason.experiments.study",
}


def trainer(config: ml_collections.ConfigDict) -> Callable[[ml_collections.ConfigDict, str], Any]:
    algorithm = config.get("algorithm", "sft")
    if algorithm not in TRAINERS:
        raise ValueError(f"algorithm={algorithm!r}; known: {sorted(TRAINERS)}")
    return importlib.import_module(TRAINERS[algorithm]).train

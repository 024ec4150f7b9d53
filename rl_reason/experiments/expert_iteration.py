"""Expert Iteration (the study's best performer): sample, keep the correct, fine-tune, repeat.

The rounds loop (`experiments/rounds.py`) with EI's choices: each round keeps
the correct, answer-cut samples (`expert_iteration.select_correct`) under
`ei/`, D_r = D_{r-1} ∪ R_r, and trains `sft_step` on D_r from the INITIAL
model each round (the study's choice; `ei.restart_from_initial=False`
continues from the last round's). Validation maj@1 picks each round's model;
held-out maj@1, maj@K and pass@K follow every round, beside the samples
drawn so far.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from rl_reason.algorithms import expert_iteration as ei
from rl_reason.experiments import rounds
from rl_reason.experiments import config as config_lib
from rl_reason.experiments.config import InvalidConfigError


class ExpertIteration(rounds.RoundsAlgorithm):
    """Keep the correct, answer-cut samples; fine-tune on them as SFT does."""

    def validate(self, config: ml_collections.ConfigDict) -> None:
        validate_ei(config)

    def label(self, chunk, prompts, round_):
        kept = ei.select_correct(
            chunk.question_ids,
            prompts,
            chunk.texts,
            chunk.rewards.totals,
            round=round_,
            threshold=self.c.threshold,
        )
        accuracy = rounds.sample_accuracy(chunk, self.c.threshold)
        return kept, {"sample_accuracy": accuracy, "kept": len(kept)}

    def arrays(self, tokenizer, dataset):
        return ei.sft_arrays(tokenizer, dataset, self.config.train.max_length)


def validate_ei(config: ml_collections.ConfigDict) -> None:
    """Raises InvalidConfigError naming every problem of an EI config before anything compiles."""
    c = config.ei
    problems = rounds_problems(config, "ei")
    if c.num_rounds < 1 or c.num_samples < 1 or c.steps_per_round < 1:
        problems.insert(0, "ei.num_rounds, ei.num_samples and ei.steps_per_round must be positive.")
    if problems:
        raise InvalidConfigError(problems)


def rounds_problems(config: ml_collections.ConfigDict, section: str) -> list[str]:
    """What a rounds algorithm's config (EI, RCRL) can get wrong in the shared settings."""
    from rl_reason.rewards import registry

    c, problems = config[section], config_lib.lora_problems(config)
    if c.eval_every < 1:
        problems.append(
            f"{section}.eval_every must be positive: validation picks each round's model."
        )
    if config.data.get("num_validation", 0) < 1:
        problems.append("data.num_validation must be positive: validation maj@1 picks models.")
    reward_sections = [s for s in ("rewards", "step_rewards") if s in c]
    problems += [
        f"{section}.{rewards} names {name!r}; known rewards: {registry.names()}."
        for rewards in reward_sections
        for name in c[rewards]
        if name not in registry.names()
    ]
    if not config.model_source.path and config.model_source.kind != "gguf":
        problems.append(
            f"model_source.path is empty: give the start model ({config.model_source.kind})."
        )
    return problems


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) Expert Iteration to ei.num_rounds; returns the last logged metrics."""
    return rounds.train(config, workdir, ExpertIteration(config))

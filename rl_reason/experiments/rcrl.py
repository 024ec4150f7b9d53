"""Return-Conditioned RL (RCRL), online in Expert Iteration's rounds.

The rounds loop (`experiments/rounds.py`) with RCRL's choices. At the start
the return tokens (`<|good|>`, `<|bad|>`) join the start model's tokenizer
and embedding (new rows the mean of the existing ones; the grown vocabulary
is in the model config every checkpoint records), and their embedding rows
learn `rcrl.return_token_lr_scale` times faster. Under LoRA (`lora.rank` > 0)
the embedding is frozen: the tokens start as their words (" good", " bad"),
apart, for the adapters to read, and the scale has no row to act on. Each round:
  - samples with the start model's own prompts in round 0 (it has never seen
    a return token), with `<|good|>` where the solution starts later (dense
    mode: before every step too, `rcrl.step_conditioning`);
  - labels EVERY sample with its return (sparse: correctness of the final
    answer; dense: the step rewards, one label per step), cut after its
    answer, under `rcrl/`: good and bad samples alike are trained on, with the
    return tokens in the prompts and out of the loss;
  - picks its model by validation maj@1 conditioned on `<|good|>`, and is
    measured on the held-out questions conditioned on `<|good|>` and,
    greedily, on `<|bad|>`.

The token to condition on is recorded in every checkpoint's progress
(`prompt_conditioning`; `step_conditioning` for dense runs), so that
`launch/evaluate.py` on an RCRL run applies it by itself.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from rl_reason.algorithms import rcrl
from rl_reason.algorithms import train_state as ts
from rl_reason.experiments import rollout, rounds, runs
from rl_reason.experiments.config import InvalidConfigError
from rl_reason.experiments.expert_iteration import rounds_problems
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import sharding as shd

GOOD, BAD = rcrl.GOOD, rcrl.BAD


class ReturnConditioned(rounds.RoundsAlgorithm):
    name, section, record_type = "RCRL", "rcrl", rcrl.RcrlSample
    start_eval_rng = 20_000
    start_record_at_next_step = True  # as RCRL's runs have always numbered it

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        c = self.c
        self.lora = bool(config.get("lora", {}).get("rank"))
        self.dense = c.mode == "dense"  # a dense model is asked for good steps, not only a start
        self.step_reward_fn = None
        if self.dense:
            from rl_reason.rewards import compose

            self.step_reward_fn = compose.compose(c.step_rewards.to_dict())
        self.thresholds = {
            "threshold": c.threshold,
            "step_threshold": c.step_threshold if self.dense else None,
        }

    def validate(self, config: ml_collections.ConfigDict) -> None:
        validate_rcrl(config)

    def prepare(self, loaded, mesh, rules) -> rounds.Start:
        # The return tokens, once: every round, resume and evaluation sees the same ids and rows.
        # Under LoRA the embedding is frozen: the tokens start as their words, apart.
        like = rcrl.RETURN_WORDS if self.lora else None
        tokenizer, params, model_config = rcrl.add_return_tokens(
            loaded.tokenizer, loaded.params, loaded.config, like=like
        )
        params = jax.device_put(params, ts.param_shardings(Transformer(model_config), mesh, rules))
        self.tokenizer = tokenizer
        self.token_ids = dict(zip((GOOD, BAD), rcrl.return_token_ids(tokenizer)))
        progress = {
            "return_tokens": self.token_ids,
            # What evaluation conditions the policy's prompts on: nothing until the
            # policy is a model trained with return tokens (dense: every step too).
            "prompt_conditioning": {"policy": ""},
            "step_conditioning": {"policy": self.dense},
        }
        if self.lora:  # what `sources.load_run` grows the recorded base by
            progress["return_token_words"] = list(like)
            return rounds.Start(tokenizer, model_config, params, progress, {})
        scales = {i: self.c.return_token_lr_scale for i in self.token_ids.values()}
        return rounds.Start(
            tokenizer, model_config, params, progress, {"embedding_row_scales": scales}
        )

    def check_resume(self, progress, start) -> None:
        if progress["return_tokens"] != self.token_ids:
            raise runs.ResumeConfigError(
                f"The return tokens' ids {self.token_ids} differ from the run's"
                f" {progress['return_tokens']} (the start model's tokenizer changed)."
            )

    def prompts(self, round_: int, prompts: list[str]) -> list[str]:
        if round_ == 0:  # the start model has never seen a return token
            return prompts
        return [rcrl.condition_prompt(p, GOOD) for p in prompts]

    def sampling_options(self, round_: int) -> dict[str, Any] | None:
        if round_ > 0 and self.dense:
            return rcrl.step_conditioning(self.tokenizer, GOOD)
        return None

    def label(self, chunk, prompts, round_):
        steps = None
        if self.step_reward_fn is not None:
            steps = lambda texts: self.step_reward_fn(texts, chunk.columns).dense  # noqa: E731
        labelled = rcrl.label_samples(
            chunk.question_ids,
            prompts,
            chunk.texts,
            chunk.rewards.totals,
            round=round_,
            step_rewards_fn=steps,
        )
        record = {
            **rcrl.label_summary(labelled, **self.thresholds),
            "sample_accuracy": rounds.sample_accuracy(chunk, self.c.threshold),
        }
        return labelled, record

    def dataset_metrics(self, dataset) -> dict[str, Any]:
        return rcrl.label_summary(dataset, **self.thresholds)

    def arrays(self, tokenizer, dataset):
        # What labels the tokens: the return (sparse) or each step's reward (dense).
        threshold = self.c.step_threshold if self.dense else self.c.threshold
        return rcrl.rcrl_arrays(
            tokenizer, dataset, self.config.train.max_length, self.c.mode, threshold=threshold
        )

    def validation(self, sampler, params, questions) -> float:
        return rollout.greedy_accuracy(
            sampler, params, questions, self.c.max_new_tokens, GOOD, self.dense
        )

    def heldout(self, sampler, params, questions, rng, *, start, exemplars=()) -> dict:
        """Conditioned on `<|good|>` after a round (and greedily on `<|bad|>`); the start
        model as round 0 samples it."""
        e = self.config.eval
        questions = questions[: e.num_examples or None]
        condition_on = "" if start else GOOD
        with shd.activation_sharding(sampler.mesh, sampler.rules):
            figures = rollout.heldout_metrics(
                sampler,
                params,
                questions,
                num_samples=e.num_samples,
                temperature=e.temperature,
                max_new_tokens=e.max_new_tokens,
                rng=rng,
                exemplars=exemplars,
                condition_on=condition_on,
                condition_steps=self.dense,
            )
        out = {f"heldout/{k}": v for k, v in figures.items()}
        if condition_on and self.c.eval_bad_token:
            out["heldout/bad_token_maj@1"] = rollout.greedy_accuracy(
                sampler, params, questions, e.max_new_tokens, BAD, self.dense
            )
        return out

    def end_of_round(self, progress: dict[str, Any]) -> None:
        progress["prompt_conditioning"] = {"policy": GOOD}


def validate_rcrl(config: ml_collections.ConfigDict) -> None:
    """Raises InvalidConfigError naming every problem of an RCRL config before anything compiles."""
    c = config.rcrl
    problems = rounds_problems(config, "rcrl")
    if c.num_rounds < 1 or c.num_samples < 1 or c.steps_per_round < 1:
        problems.insert(
            0, "rcrl.num_rounds, rcrl.num_samples and rcrl.steps_per_round must be positive."
        )
    if not c.return_token_lr_scale > 0:
        problems.append("rcrl.return_token_lr_scale must be positive.")
    if c.mode not in rcrl.MODES:
        problems.append(f"rcrl.mode={c.mode!r} not in {rcrl.MODES}.")
    if problems:
        raise InvalidConfigError(problems)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) RCRL to rcrl.num_rounds; returns the last logged metrics."""
    return rounds.train(config, workdir, ReturnConditioned(config))

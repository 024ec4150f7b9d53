"""The rollout stage every RL algorithm shares: prompts -> samples -> rewards.

PPO and GRPO turn the result into advantages, Expert Iteration keeps the
correct samples, RCRL labels them with return tokens, the ORM learns from
them: all of them start here. The sampler reads the learner's parameters as
they are, on the same mesh (no copy into another engine). Held-out
evaluation during training (maj@1, maj@K, pass@K) lives here too, so that
every algorithm reports the study's metrics against samples drawn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rl_reason.algorithms import rcrl
from rl_reason.data import templates
from rl_reason.evaluation.evaluate import evaluate as score_samples
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose
from rl_reason.rewards.token_positions import sampled_token_rewards
from rl_reason.sampling.engine import Sampler, Samples
from rl_reason.sampling.sampler import LENGTH, SamplingConfig


@dataclasses.dataclass
class RolloutBatch:
    """K samples for each of a batch's prompts, their rewards, as training arrays.

    Rows are prompt-major (row = prompt * K + k). Every [N, L] array is
    aligned with `sequences["tokens"]` (prompt, then completion): entry t is
    about token t.
    """

    samples: Samples
    examples: list[Mapping[str, Any]]  # one per row
    rewards: compose.Rewards
    sequences: dict[str, np.ndarray]  # tokens, input_mask, loss_mask [N, L]
    token_scores: np.ndarray  # [N, L] float32 rewards paid at sampled tokens

    @property
    def texts(self) -> list[str]:
        return self.samples.texts

    @property
    def num_samples(self) -> int:
        return self.samples.num_samples

    def totals(self) -> np.ndarray:
        return np.asarray(self.rewards.totals, np.float32)

    def metrics(self) -> dict[str, float]:
        """What a researcher watches a rollout by: rewards, each component, lengths."""
        rollout = self.samples.rollout
        totals = self.totals()
        out = {
            "reward_mean": float(totals.mean()),
            "reward_std": float(totals.std()),
            "response_length": float(rollout.lengths.mean()),
            "cut_by_length": float(np.mean(rollout.finish_reason == LENGTH)),
        }
        for name, values in self.rewards.components.items():
            out[f"reward/{name}"] = float(np.mean(values))
        return out


def collect(
    sampler: Sampler,
    params: Any,
    examples: Sequence[Mapping[str, Any]],
    prompts: Sequence[str],
    rng: jax.Array,
    config: SamplingConfig,
    reward_fn: compose.Composite,
    prompt_offset: int = 0,
) -> RolloutBatch:
    """Samples config.num_samples completions per prompt and scores them.

    Rewards see every column of the example (question, answer, final_answer,
    ...) plus `prompt`; dense rewards land on the sampled tokens that complete
    the text they judge, sparse ones on each completion's last token.
    """
    samples = sampler.generate(params, prompts, rng, config, prompt_offset=prompt_offset)
    k = config.num_samples
    rows = [ex for ex in examples for _ in range(k)]
    columns = {key: [ex[key] for ex in rows] for key in rows[0]} if rows else {}
    columns["prompt"] = [p for p in prompts for _ in range(k)]
    rewards = reward_fn(samples.texts, columns)
    rollout = samples.rollout
    completion_scores = sampled_token_rewards(
        sampler.tokenizer, rewards.dense, samples.texts, rollout.completion_tokens, rollout.lengths
    )
    sequences = {key: np.asarray(value) for key, value in rollout.sequences().items()}
    prompt_len = rollout.prompt_tokens.shape[1]
    token_scores = np.zeros(sequences["tokens"].shape, np.float32)
    token_scores[:, prompt_len:] = completion_scores
    return RolloutBatch(samples, rows, rewards, sequences, token_scores)


def sample_k(
    sampler: Sampler,
    params: Any,
    prompts: Sequence[str],
    rng: jax.Array,
    *,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    samples_per_call: int = 0,
    prompt_offset: int = 0,
    prefix_length: int | None = None,
    sampling_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """num_samples completions per prompt, prompt-major, drawn samples_per_call at a time
    (0: all in one call; the study's K=96 rows per prompt need not share one KV cache).
    ``sampling_options``: further SamplingConfig fields (dense RCRL's step conditioning).

    The sampled chunks of a loop (EI's solutions, the ORM's labelled samples)
    come from here: with the set's prompt_offset and shared prefix_length, a
    prompt's draws depend on its index in the set, not on how it was chunked.
    """
    per_call = samples_per_call or num_samples
    calls = -(-num_samples // per_call)
    groups: list[list[str]] = [[] for _ in prompts]
    for call in range(calls):
        count = min(per_call, num_samples - call * per_call)
        config = sampler.sampling_config(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            num_samples=count,
            **(sampling_options or {}),
        )
        with shd.activation_sharding(sampler.mesh, sampler.rules):
            out = sampler.generate(
                params,
                prompts,
                rng if calls == 1 else jax.random.fold_in(rng, call),
                config,
                prompt_offset=prompt_offset,
                prefix_length=prefix_length,
            )
        for group, texts in zip(groups, out.texts_per_prompt()):
            group.extend(texts)
    return [text for group in groups for text in group]


def columns_k(examples: Sequence[Mapping[str, Any]], k: int) -> dict[str, list[Any]]:
    """Every column of `examples`, each row repeated k times (prompt-major): what
    rewards see beside k samples per example."""
    return {key: [ex[key] for ex in examples for _ in range(k)] for key in examples[0]}


def heldout_metrics(
    sampler: Sampler,
    params: Any,
    questions: Sequence[Mapping[str, Any]],
    *,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    rng: jax.Array,
    exemplars: Sequence[Mapping[str, str]] = (),
    condition_on: str = "",
    condition_steps: bool = False,
) -> dict[str, float]:
    """maj@1 (greedy), maj@K, pass@K and diversity on held-out questions, in one
    sampler call (the greedy row continues the K samples' prefill).

    `condition_on`: a return token every prompt carries where its solution
    starts (an RCRL model asked for a high-return solution); "" for none.
    With `condition_steps` the token also starts every later step (a dense
    RCRL model).
    """
    prompts = [templates.format_prompt(q["question"], exemplars) for q in questions]
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, temperature=0.0)
    if condition_on:
        prompts = [rcrl.condition_prompt(p, condition_on) for p in prompts]
        if condition_steps:
            options.update(rcrl.step_conditioning(sampler.tokenizer, condition_on))
    if num_samples > 0:
        options.update(temperature=temperature, num_samples=num_samples + 1, greedy_first=True)
    out = sampler.generate(params, prompts, rng, sampler.sampling_config(**options))
    groups = out.texts_per_prompt()
    greedy = [g[0] for g in groups]
    k_texts = [g[1:] if num_samples > 0 else [g[0]] for g in groups]
    return score_samples(k_texts, [q["final_answer"] for q in questions], greedy=greedy)


def evaluate_heldout(
    sampler: Sampler,
    params: Any,
    questions: Sequence[Mapping[str, Any]],
    eval_config,
    rng: jax.Array,
    exemplars: Sequence[Mapping[str, str]] = (),
) -> dict[str, float]:
    """heldout_metrics with a run's `eval` section (num_examples, num_samples, temperature,
    max_new_tokens), on the sampler's mesh."""
    with shd.activation_sharding(sampler.mesh, sampler.rules):
        return heldout_metrics(
            sampler,
            params,
            questions[: eval_config.num_examples or None],
            num_samples=eval_config.num_samples,
            temperature=eval_config.temperature,
            max_new_tokens=eval_config.max_new_tokens,
            rng=rng,
            exemplars=exemplars,
        )

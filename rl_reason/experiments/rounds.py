"""What the round loops share: Expert Iteration and Return-Conditioned RL.

A round samples K completions for every train question from the current
policy in chunks of `sampling_chunk` questions, each chunk's records written
to a file of its own (a kill loses one chunk at most), merges them with the
earlier rounds' into the round's dataset file (checksummed; its digest goes
into the checkpoint), fine-tunes with `sft_step` and picks the round's
checkpoint by validation maj@1. What a round keeps from its samples and how
a record becomes a training row is the algorithm's: EI keeps the correct
samples (`expert_iteration.select_correct`), RCRL labels every sample with
its return (`rcrl.label_samples`).

The loops own their state and their checkpoints. `sample_chunks` and
`train_steps` are generators that sample one chunk or take one step, then
hand control back, so that the loop writes, logs and saves what it holds
after each; everything random comes from (seed, round, question index) or
from the TrainState, so a resumed loop repeats the interrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from rl_reason.algorithms import expert_iteration as ei
from rl_reason.data.iterator import IndexIterator
from rl_reason.experiments import rollout, runs
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose
from rl_reason.sampling.engine import Sampler, common_prefix_length


class RoundFiles:
    """A run's round files under `<workdir>/<directory>/`: each round's per-chunk
    records (`round_<r>/chunk_<c>.jsonl`) and its accumulated dataset
    (`dataset_round_<r>.jsonl`), as `expert_iteration.to_jsonl` writes records
    of `record_type`."""

    def __init__(self, workdir: str, directory: str = "ei", record_type: type = ei.Solution):
        self.root = os.path.join(workdir, directory)
        self.record_type = record_type

    def chunk(self, round_: int, chunk: int) -> str:
        return os.path.join(self.root, f"round_{round_}", f"chunk_{chunk:05d}.jsonl")

    def dataset(self, round_: int) -> str:
        return os.path.join(self.root, f"dataset_round_{round_}.jsonl")

    def write(self, path: str, records: Sequence[Any]) -> None:
        runs.write_solutions(path, records, self.record_type)

    def read(self, path: str, digest: str | None = None) -> tuple[Any, ...]:
        return runs.read_solutions(path, digest, self.record_type)

    def read_round(self, round_: int, num_chunks: int) -> list[Any]:
        """Every record round `round_` sampled, in chunk order."""
        return [s for i in range(num_chunks) for s in self.read(self.chunk(round_, i))]


def copy_tree(tree: Any) -> Any:
    """A copy that survives the donation of the original's buffers to the next step."""
    return jax.tree.map(jnp.copy, tree)


def num_chunks(num_questions: int, chunk_size: int) -> int:
    return len(range(0, num_questions, chunk_size))


def previous_dataset(files: RoundFiles, progress: Mapping[str, Any]) -> tuple[Any, ...]:
    """The dataset the checkpoint's progress records (empty before the first round's)."""
    recorded = progress["dataset"]
    if recorded["round"] < 0:
        return ()
    return files.read(files.dataset(recorded["round"]), recorded["digest"])


def accumulate_round(
    files: RoundFiles,
    progress: Mapping[str, Any],
    round_: int,
    chunks: int,
    max_per_question: int = 0,
) -> tuple[tuple[Any, ...], ei.RoundSummary]:
    """D_r = D_{r-1} ∪ (round r's records), deduplicated per question, written to the
    round's dataset file; returns it and what changed."""
    dataset, summary = ei.accumulate(
        previous_dataset(files, progress),
        files.read_round(round_, chunks),
        max_per_question=max_per_question or None,
    )
    files.write(files.dataset(round_), dataset)
    return dataset, summary


@dataclasses.dataclass
class SampledChunk:
    """K samples for each question of one chunk, scored; rows are prompt-major."""

    index: int  # the chunk's number in the round
    question_ids: list[int]  # per row: the question's index in the train set
    texts: list[str]
    columns: dict[str, list[Any]]  # per row: every column of its question's example
    rewards: compose.Rewards


def sample_chunks(
    sampler: Sampler,
    params: Any,
    questions: Sequence[Mapping[str, Any]],
    prompts: Sequence[str],
    rng: jax.Array,
    c: ml_collections.ConfigDict,
    reward_fn: compose.Composite,
    *,
    start: int,
    desc: str,
    show_progress: bool,
    sampling_options: Mapping[str, Any] | None = None,
) -> Iterator[SampledChunk]:
    """The round's chunks from chunk `start` on, each sampled (c.num_samples per prompt
    with `params`, further SamplingConfig fields in `sampling_options`) and scored by
    `reward_fn` on every column of its examples.

    A prompt's draws depend on its index in `prompts` (not on the chunking or
    on where a resumed run starts), and every chunk prefills the prefix all
    prompts share.
    """
    shared = common_prefix_length(sampler.token_ids(prompts))
    chunks = range(0, len(prompts), c.sampling_chunk)
    for index in tqdm.tqdm(
        range(start, len(chunks)), desc=desc, disable=not show_progress or jax.process_index() != 0
    ):
        first = chunks[index]
        part = questions[first : first + c.sampling_chunk]
        texts = rollout.sample_k(
            sampler,
            params,
            prompts[first : first + c.sampling_chunk],
            rng,
            num_samples=c.num_samples,
            temperature=c.temperature,
            max_new_tokens=c.max_new_tokens,
            samples_per_call=c.samples_per_call,
            prompt_offset=first,
            prefix_length=shared,
            sampling_options=sampling_options,
        )
        k = c.num_samples
        columns = rollout.columns_k(part, k)
        rewards = reward_fn(texts, columns)
        qids = [first + i for i in range(len(part)) for _ in range(k)]
        yield SampledChunk(index, qids, texts, columns, rewards)


def greedy_accuracy(
    sampler: Sampler, params, questions, c, condition_on: str = "", condition_steps: bool = False
) -> float:
    """Greedy maj@1 on `questions` (validation), prompts (and with `condition_steps`
    every step) conditioned on `condition_on`."""
    with shd.activation_sharding(sampler.mesh, sampler.rules):
        metrics = rollout.heldout_metrics(
            sampler,
            params,
            questions,
            num_samples=0,
            temperature=0.0,
            max_new_tokens=c.max_new_tokens,
            rng=jax.random.PRNGKey(0),
            condition_on=condition_on,
            condition_steps=condition_steps,
        )
    return metrics["maj@1"]


def train_steps(
    step_fn: Callable,
    state: Any,
    best_params: Any,
    arrays: Mapping[str, Any],
    progress: dict[str, Any],
    config: ml_collections.ConfigDict,
    c: ml_collections.ConfigDict,
    *,
    round_: int,
    validate: Callable[[Any], float],
    mesh,
    last_checkpoint: Callable[[], int | None],
    name: str,
) -> Iterator[tuple[Any, Any, dict[str, Any] | None]]:
    """The round's SFT steps on `arrays` from `progress["sft_step"]` to c.steps_per_round.

    Each step updates `progress` (sft_step, data position, global step) and
    yields (state, best_params, record): the record to log (None between
    log_every steps). Validation maj@1 (`validate(params)`) every c.eval_every
    steps and at the end; the best so far is `progress["best"]` and its
    params `best_params` (early stopping, as the study chooses a round's
    checkpoint). A non-finite step stops the run (`runs.check_finite`).
    """
    chex.assert_equal_shape_prefix(list(arrays.values()), 1)  # one row per record, every array
    size = len(next(iter(arrays.values())))
    iterator = IndexIterator(size, config.train.batch_size, seed=config.seed * 1000 + round_)
    if "data" in progress:
        iterator.restore(progress["data"])
    for step in tqdm.trange(
        progress["sft_step"],
        c.steps_per_round,
        desc=f"{name} round {round_}: training on {size}",
        disable=not config.logging.progress_bar or jax.process_index() != 0,
    ):
        rows = next(iterator)
        batch = {key: value[rows] for key, value in arrays.items()}
        state, metrics = step_fn(state, shd.shard_batch(batch, mesh))
        metrics = jax.device_get(metrics)
        runs.check_finite(metrics, f"{name} round {round_} step {step + 1}", last_checkpoint())
        done = step + 1
        progress.update(
            sft_step=done, data=iterator.state(), global_step=progress["global_step"] + 1
        )
        record = dict(metrics)
        if done % c.eval_every == 0 or done == c.steps_per_round:
            validation = validate(state.params)
            record["validation/maj@1"] = validation
            if validation > progress["best"]["maj@1"]:
                progress["best"] = {"maj@1": validation, "step": done}
                best_params = copy_tree(state.params)
        logged = done % config.train.log_every == 0 or "validation/maj@1" in record
        yield state, best_params, record if logged else None

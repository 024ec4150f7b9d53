"""The rounds loop: Expert Iteration and Return-Conditioned RL are one loop.

Round r:
  1. sample -- K completions for every train question from the policy chosen
     at the end of round r-1 (the start model in round 0), in chunks of
     `sampling_chunk` questions (`rollout.sample_chunks`); the algorithm turns
     each chunk into records (EI keeps the correct samples, RCRL labels every
     sample with its return), saved to `<dir>/round_<r>/chunk_<c>.jsonl`
     before a checkpoint records the chunk.
  2. accumulate -- D_r = D_{r-1} ∪ (round r's records), deduplicated per
     question, to `<dir>/dataset_round_<r>.jsonl` (checksummed; its digest is
     in the checkpoint).
  3. train -- `sft_step` on the algorithm's arrays of D_r for
     `steps_per_round` steps, from the start model (`restart_from_initial`) or
     the last round's, with a fresh optimizer; validation maj@1 every
     `eval_every` steps picks the round's model (early stopping).
  4. the chosen model is measured on the held-out questions beside the count
     of samples drawn so far (the study's x-axis), and becomes the policy.

What differs between the algorithms is a `RoundsAlgorithm` (the config
section, the record type, prompts, labels, arrays, evaluation); the loop,
its files and its checkpoints are here. The checkpoint step is a global
counter that rises with every sampling chunk and every SFT step; everything
random comes from (seed, round, question index) or from the checkpointed
TrainState, so a run killed at any point and restarted with the same command
ends with the parameters and metrics of an uninterrupted run.

With LoRA (`lora.rank` > 0) every round trains adapters on the frozen start
model: the state's base is the only copy of it (sampling reads it merged with
the chosen adapters), the chosen model and the checkpoints are the adapters
(and heads) alone, and a round that restarts from the start model begins from
fresh adapters.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from rl_reason import checkpointing
from rl_reason.algorithms import expert_iteration as ei
from rl_reason.algorithms import optimizer
from rl_reason.algorithms import train_state as ts
from rl_reason.data import records, templates
from rl_reason.data.iterator import IndexIterator
from rl_reason.experiments import adapters, rollout, runs, sources, tasks
from rl_reason.experiments import sft as sft_experiment
from rl_reason.models import lora, precision
from rl_reason.models.config import ModelConfig
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose
from rl_reason.sampling.engine import Sampler

_log = logging.getLogger(__name__)

SAMPLE, TRAIN = "sample", "train"


def copy_tree(tree: Any) -> Any:
    """A copy that survives the donation of the original's buffers to the next step."""
    return jax.tree.map(jnp.copy, tree)


@dataclasses.dataclass
class Start:
    """The model a rounds run starts from, as its algorithm prepares it."""

    tokenizer: Any
    model_config: ModelConfig
    params: Any  # sharded like the trained state's
    progress: dict[str, Any]  # what a fresh run's progress records besides the loop's
    optimizer_options: dict[str, Any]  # further `optimizer.make_optimizer` arguments


class RoundsAlgorithm:
    """What an algorithm of the rounds loop supplies: its config section and records,
    how a sampled chunk becomes records (`label`) and records training rows
    (`arrays`); the rest has defaults an algorithm may override.

    Expert Iteration (`experiments/expert_iteration.py`) keeps the correct samples;
    RCRL (`experiments/rcrl.py`) labels every sample with its return.
    """

    name = "EI"  # in logs and errors
    section = "ei"  # its config section, and its directory under the workdir
    record_type: type = records.Solution
    start_eval_rng = 9_999  # the start model's held-out evaluation key (fold_in(seed, .))
    start_record_at_next_step = False  # the start's record: at its step, or after it

    def __init__(self, config: ml_collections.ConfigDict):
        self.config, self.c = config, config[self.section]

    def validate(self, config: ml_collections.ConfigDict) -> None:
        """Raises InvalidConfigError naming every problem of the config."""
        raise NotImplementedError

    def label(
        self, chunk: rollout.SampledChunk, prompts: Sequence[str], round_: int
    ) -> tuple[list[Any], dict[str, Any]]:
        """The chunk's records (stored with `prompts`, one per row) and what to log of them."""
        raise NotImplementedError

    def arrays(self, tokenizer, dataset: Sequence[Any]) -> tuple[dict[str, Any], int]:
        """{tokens, input_mask, loss_mask} of the dataset's records, and how many were cut."""
        raise NotImplementedError

    def prepare(self, loaded: sources.LoadedModel, mesh, rules) -> Start:
        return Start(loaded.tokenizer, loaded.config, loaded.params, {}, {})

    def check_resume(self, progress: Mapping[str, Any], start: Start) -> None:
        """Raises ResumeConfigError when the checkpoint's progress contradicts `start`."""

    def prompts(self, round_: int, prompts: list[str]) -> list[str]:
        """The prompts round `round_` samples (given the zero- or few-shot ones)."""
        return prompts

    def sampling_options(self, round_: int) -> dict[str, Any] | None:
        return None

    def dataset_metrics(self, dataset: Sequence[Any]) -> dict[str, Any]:
        return {}

    def validation(self, sampler: Sampler, params: Any, questions) -> float:
        return rollout.greedy_accuracy(sampler, params, questions, self.c.max_new_tokens)

    def heldout(self, sampler, params, questions, rng, *, start: bool, exemplars=()) -> dict:
        """The held-out record of the start model (`start`) or of a round's."""
        figures = rollout.evaluate_heldout(
            sampler, params, questions, self.config.eval, rng, exemplars=exemplars
        )
        return {f"heldout/{k}": v for k, v in figures.items()}

    def end_of_round(self, progress: dict[str, Any]) -> None:
        """Further progress after a round (what evaluation of the run should know)."""


def sample_accuracy(chunk: rollout.SampledChunk, threshold: float) -> float:
    """The fraction of the chunk's samples whose reward reaches `threshold`."""
    return float(np.mean(np.asarray(chunk.rewards.totals) >= threshold))


def train(config: ml_collections.ConfigDict, workdir: str, algorithm: RoundsAlgorithm) -> dict:
    """Runs (or resumes) `algorithm` to its num_rounds; returns the last logged metrics."""
    with runs.Run(config, workdir, algorithm.validate) as run:
        loop = _Rounds(run, algorithm)
        if loop.progress["round"] >= loop.c.num_rounds:
            return run.finished(f"finished its {loop.c.num_rounds} rounds")
        return loop.run_rounds()


class _Rounds:
    """One rounds run's state between checkpoints, and its phases."""

    def __init__(self, run: runs.Run, algorithm: RoundsAlgorithm):
        config, mesh, rules = run.config, run.mesh, run.rules
        self.run, self.algorithm, self.config = run, algorithm, config
        self.c = c = algorithm.c
        self.task = tasks.load(config)
        self.store = rollout.RecordStore(run.workdir, algorithm.section, algorithm.record_type)
        source = config.model_source
        loaded = sources.load_model(source.kind, source.path, mesh, rules)
        if config.train.remat:  # recomputation changes no parameter, only what the step keeps
            loaded = loaded._replace(config=loaded.config.replace(remat=config.train.remat))
        initial_ids = sources.fingerprints(loaded.params)
        initial_id = initial_ids[0]
        start = algorithm.prepare(loaded, mesh, rules)
        del loaded
        self.model = model = Transformer(start.model_config)
        self.tokenizer = start.tokenizer
        self.tx, schedule = optimizer.make_optimizer(
            config.optim, c.steps_per_round, **start.optimizer_options
        )
        # LoRA: the learner trains adapters; the start model is the state's base, never copied.
        self.lora = adapters.lora_config(config)
        self.learner = model
        if self.lora is not None:
            self.learner, self.tx = lora.LoraModel(model, self.lora), lora.lora_optimizer(self.tx)
            self._merged = lora.Merger(self.lora)
        # Full fine-tuning keeps the start for rounds that restart from it.
        self.initial_params = start.params if self.lora is None else None
        abstract = ts.abstract_train_state(self.learner, self.tx, mesh, rules)
        restored = run.restore(self._items(abstract, self._kept(abstract.params)))
        if restored is not None:
            items, self.progress = restored
            if self.lora is None:
                self.state = checkpointing.merge_train_state("policy", items)
                self.best = items["best.params"]
            else:
                self.state = adapters.merge_state_items(items, start.params)
                self.best = items["best.lora"]
            if self.progress["initial"] not in initial_ids:
                raise runs.ResumeConfigError(
                    f"The start model from {source.path!r} changed since the run began"
                    f" (checksum {initial_id}, recorded {self.progress['initial']})."
                )
            algorithm.check_resume(self.progress, start)
        else:
            self.progress = {
                "round": 0,
                "phase": SAMPLE,
                "chunk": 0,
                "global_step": 0,
                "samples_drawn": 0,
                "start_evaluated": not config.eval.at_start,
                "initial": initial_id,
                "dataset": {"round": -1, "digest": records.dataset_digest(()), "count": 0},
                "models": {"policy": model.config.to_dict()},
                **start.progress,
            }
            if self.lora is not None:  # what `sources.load_run` rebuilds the policy from
                self.progress["lora"] = adapters.record(config, self.lora, initial_id)
            self.state = self._fresh_state(config.seed, start.params)
            self.best = copy_tree(self._kept(self.state.params))
        del start  # its parameters are the state's now (and the initial copy's)
        self.sampler = rollout.run_sampler(
            config, model.config, self.tokenizer, mesh, rules, progress=run.show_progress
        )
        self.reward_fn = compose.compose(c.rewards.to_dict())
        # The sampler/learner mismatch, per chunk, when either computes in less than float32.
        below = precision.sampler_or_learner_below_float32(
            model.config, config.sampling.get("dtype")
        )
        self.mismatch = rollout.MismatchMeter(model) if below else None
        self.step_fn = sft_experiment.jit_sft_step(
            config, self.learner, self.tx, schedule, mesh, rules
        )
        self.exemplars = templates.select_exemplars(
            self.task.train, c.first_round_shots, seed=config.seed
        )
        self.base_rng = jax.random.PRNGKey(config.seed)
        self.last: dict[str, Any] = {}

    def _fresh_state(self, seed: int, base: Any, chosen: Any | None = None):
        """A new TrainState (fresh optimizer) from `chosen` (a `_kept`; None: the start).

        Full fine-tuning copies the params (the step donates its state's buffers);
        LoRA puts `chosen`'s adapters, or fresh ones, on `base` as it is. Either
        way the state takes the buffers it is given (no second copy of the model):
        under LoRA `base` is the start or the previous state's, read by nothing else.
        """
        if self.lora is None:
            params = copy_tree(base if chosen is None else chosen)
        elif chosen is None:
            params = adapters.initial_params(
                self.config, self.learner, base, jax.random.PRNGKey(seed)
            )
        else:
            params = lora.with_trained_part(base, copy_tree(chosen))
        return ts.create_train_state(
            self.learner, self.tx, self.run.mesh, self.run.rules, seed, params=params, donate=True
        )

    def _kept(self, params: Any) -> Any:
        """What a round keeps of a state's params as its chosen model: all of them, or
        under LoRA the adapters and heads (the base is the state's)."""
        return params if self.lora is None else lora.trained_part(params)

    def policy(self, chosen: Any | None = None) -> Any:
        """What the sampler reads: `chosen` (None: the state's params) as plain params."""
        if self.lora is None:
            return self.state.params if chosen is None else chosen
        params = self.state.params
        if chosen is not None:
            params = lora.with_trained_part(params["base"], chosen)
        return self._merged(params)

    def _items(self, state, chosen) -> dict[str, Any]:
        """The checkpoint items: the state and the chosen model (under LoRA, their adapters)."""
        if self.lora is None:
            return {**checkpointing.train_state_items("policy", state), "best.params": chosen}
        return {**adapters.state_items(state), "best.lora": chosen}

    def log(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return self.run.log(
            self.progress["global_step"], {"round": self.progress["round"], **record}
        )

    def advance(self, **changes: Any) -> None:
        """Progress moves on by one global step (with `changes`)."""
        self.progress.update(changes, global_step=self.progress["global_step"] + 1)

    def checkpoint(self, force: bool = False) -> None:
        items = self._items(self.state, self.best)
        finished = self.progress["round"] >= self.c.num_rounds
        self.run.checkpoint(
            self.progress["global_step"], items, self.progress, force=force, finished=finished
        )

    def run_rounds(self) -> dict[str, Any]:
        self.run.begin(self.tokenizer, self.progress["global_step"])
        if not self.progress.get("start_evaluated", not self.config.eval.at_start):
            self.evaluate_start()
        while self.progress["round"] < self.c.num_rounds:
            r = self.progress["round"]
            if self.progress["phase"] == SAMPLE:
                self.sample(r)
                self.accumulate(r)
            self.train(r)
            self.end_round(r)
        return self.last

    def evaluate_start(self) -> None:
        """The start model as round 0 samples it: the x = 0 point of the study's curves."""
        rng = jax.random.fold_in(self.base_rng, self.algorithm.start_eval_rng)
        record = self.algorithm.heldout(
            self.sampler,
            self.policy(self.best),
            self.task.heldout,
            rng,
            start=True,
            exemplars=self.exemplars,
        )
        record["samples_drawn"] = 0
        if self.algorithm.start_record_at_next_step:
            self.advance(start_evaluated=True)
            self.last = self.log(record)
        else:
            self.last = self.log(record)
            self.advance(start_evaluated=True)
        self.checkpoint(force=True)

    def sample(self, r: int) -> None:
        """Round r's chunks from the checkpoint's on, each saved, logged and checkpointed."""
        shots = self.exemplars if r == 0 else ()
        train = self.task.train
        prompts = self.algorithm.prompts(
            r, [templates.format_prompt(q["question"], shots) for q in train]
        )
        stored = [templates.format_prompt(q["question"]) for q in train]
        c, s = self.c, self.config.sampling
        options = self.algorithm.sampling_options(r)
        policy = self.policy(self.best)  # LoRA: merged once for the round's chunks
        chunks = rollout.sample_chunks(
            self.sampler,
            policy,
            train,
            prompts,
            jax.random.fold_in(self.base_rng, r),
            rollout.ChunkSampling(
                c.num_samples, c.temperature, c.max_new_tokens, s.chunk, s.samples_per_call
            ),
            self.reward_fn,
            start=self.progress["chunk"],
            desc=f"{self.algorithm.name} round {r}: sampling",
            show_progress=self.run.show_progress,
            sampling_options=options,
            measure=self._measure(policy, options),
        )
        for chunk in chunks:
            kept, record = self.algorithm.label(chunk, [stored[i] for i in chunk.question_ids], r)
            self.store.write(self.store.chunk(f"round_{r}", chunk.index), kept)
            drawn = self.progress["samples_drawn"] + len(chunk.texts)
            self.advance(chunk=chunk.index + 1, samples_drawn=drawn)
            self.log({**record, **chunk.mismatch, "samples_drawn": drawn})
            # Every chunk: sampling costs far more than a save, whatever the interval.
            self.checkpoint(force=True)

    def _measure(self, policy, options) -> Callable | None:
        """The chunks' mismatch measure, None when there is nothing to measure, or when the
        sampler gives tokens of its own (dense RCRL's step tokens: not the model's choice,
        scored 0 by the sampler)."""
        if self.mismatch is None or options:
            return None
        return functools.partial(self.mismatch, policy)

    def accumulate(self, r: int) -> None:
        """D_r = D_{r-1} ∪ (round r's records), written; the train phase begins."""
        recorded = self.progress["dataset"]
        previous = (
            self.store.read(
                self.store.dataset(f"dataset_round_{recorded['round']}"), recorded["digest"]
            )
            if recorded["round"] >= 0
            else ()
        )
        chunks = rollout.num_chunks(len(self.task.train), self.config.sampling.chunk)
        dataset, summary = ei.accumulate(
            previous,
            self.store.read_chunks(f"round_{r}", chunks),
            max_per_question=self.c.max_per_question or None,
        )
        self.store.write(self.store.dataset(f"dataset_round_{r}"), dataset)
        digest = records.dataset_digest(dataset)
        self.advance(
            phase=TRAIN,
            sft_step=0,
            best={"maj@1": -1.0, "step": 0},
            dataset={"round": r, "digest": digest, "count": len(dataset)},
        )
        self.progress.pop("data", None)
        base = self.initial_params if self.lora is None else self.state.params["base"]
        chosen = None if self.c.restart_from_initial else self.best
        self.state = self._fresh_state(self.config.seed + r, base, chosen)
        self.last = self.log(
            {
                **{f"dataset/{k}": v for k, v in summary.as_dict().items()},
                **{f"dataset/{k}": v for k, v in self.algorithm.dataset_metrics(dataset).items()},
            }
        )
        self.checkpoint(force=True)

    def train(self, r: int) -> None:
        """Round r's SFT steps from the checkpoint's on, on the round's dataset."""
        dataset = self.store.read(
            self.store.dataset(f"dataset_round_{r}"), self.progress["dataset"]["digest"]
        )
        if not dataset:  # nothing kept: the round's model stays the one it sampled with
            _log.warning("%s round %d kept no sample; it trains nothing.", self.algorithm.name, r)
            return
        arrays, cut = self.algorithm.arrays(self.tokenizer, dataset)
        if cut:
            _log.warning(
                "%d of %d %s samples are longer than train.max_length.",
                cut,
                len(dataset),
                self.algorithm.name,
            )
        for record in self.sft_steps(arrays, r):
            if record is not None:
                self.last = self.log(record)
            self.checkpoint(force=self.progress["sft_step"] == self.c.steps_per_round)

    def sft_steps(self, arrays: Mapping[str, Any], r: int) -> Iterator[dict[str, Any] | None]:
        """One SFT step at a time, yielding the record to log (None between log_every steps).

        Validation maj@1 every eval_every steps and at the end; the best so far
        is `progress["best"]` and its model `best` (early stopping, as
        the study chooses a round's checkpoint).
        """
        config, c, progress = self.config, self.c, self.progress
        chex.assert_equal_shape_prefix(list(arrays.values()), 1)  # a row per record
        size = len(next(iter(arrays.values())))
        iterator = IndexIterator(size, config.train.batch_size, seed=config.seed * 1000 + r)
        if "data" in progress:
            iterator.restore(progress["data"])
        for step in tqdm.trange(
            progress["sft_step"],
            c.steps_per_round,
            desc=f"{self.algorithm.name} round {r}: training on {size}",
            disable=not self.run.show_progress,
        ):
            rows = next(iterator)
            batch = {key: value[rows] for key, value in arrays.items()}
            self.state, metrics = self.step_fn(self.state, shd.shard_batch(batch, self.run.mesh))
            metrics = jax.device_get(metrics)
            self.run.check_finite(metrics, f"{self.algorithm.name} round {r} step {step + 1}")
            done = step + 1
            self.advance(sft_step=done, data=iterator.state())
            record = dict(metrics)
            if done % c.eval_every == 0 or done == c.steps_per_round:
                validation = self.algorithm.validation(
                    self.sampler, self.policy(), self.task.validation
                )
                record["validation/maj@1"] = validation
                if validation > progress["best"]["maj@1"]:
                    progress["best"] = {"maj@1": validation, "step": done}
                    self.best = copy_tree(self._kept(self.state.params))
            logged = done % config.train.log_every == 0 or "validation/maj@1" in record
            yield record if logged else None

    def end_round(self, r: int) -> None:
        """The round's chosen model measured, then made the policy."""
        rng = jax.random.fold_in(self.base_rng, 10_000 + r)
        figures = self.algorithm.heldout(
            self.sampler, self.policy(self.best), self.task.heldout, rng, start=False
        )
        self.advance(round=r + 1, phase=SAMPLE, chunk=0)
        self.algorithm.end_of_round(self.progress)
        best = self.progress["best"]
        self.last = self.log(
            {
                **figures,
                "samples_drawn": self.progress["samples_drawn"],
                "selected_step": best["step"],
                "selected_validation_maj@1": best["maj@1"],
                "dataset_size": self.progress["dataset"]["count"],
            }
        )
        # The selected model becomes the policy: what sampling and evaluation read.
        params = copy_tree(self.best)
        if self.lora is not None:
            params = lora.with_trained_part(self.state.params["base"], params)
        self.state = self.state.replace(params=params)
        self.checkpoint(force=True)

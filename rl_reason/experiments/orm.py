"""The outcome reward model (ORM) run: sample, label by correctness, train, measure.

As the study does (after Cobbe et al., 2021):
  1. sample -- K completions for every train question, then K = eval.num_samples
     for each of the first eval.num_examples held-out questions, from the policy
     (`model_source`: an SFT or EI run, a Hugging Face directory, a GGUF file),
     in chunks of `orm.sampling_chunk` questions. Each chunk's samples, scored by
     the reward library (`orm.rewards`, final-answer correctness by default), go
     to `orm/<split>/chunk_<c>.jsonl` and a checkpoint records the chunk; then
     `orm/train.jsonl` and `orm/heldout.jsonl` are assembled, their digests in
     the checkpoint. A sample is labelled correct when its reward reaches
     `orm.threshold`.
  2. train -- a scalar head `orm` on the model of `orm.init_source` (by default
     the policy itself: the study starts the ORM from the SFT model), trained
     with the pure `orm_step` (per-token binary cross-entropy against the
     sample's label, class-balanced) on shuffled batches of the train samples.
  3. measure -- every `train.eval_every` steps and at the end, the ORM's score of
     each held-out sample (its final token, read by the same batched scorer
     evaluation's rerank@K uses): AUC against the labels, accuracy at 0.5, and
     rerank@K beside maj@K and pass@K of the same K samples.
  4. select -- with `data.num_validation` questions held back from the train
     split, their samples (drawn like the held-out ones) are measured at the
     same steps, and the ORM with the best validation within-question AUC
     (what reranking needs) is the run's ORM: it replaces the last one at the
     end, and its held-out figures are logged once more as `selected/*`.
     The held-out questions then only measure; they choose nothing.

The samples are drawn once, before any training, because they depend on the
policy alone; held-out samples are never trained on. The checkpoint holds the
ORM as the `orm` model (`orm.params`, what `sources.load_model("run", path,
name="orm")`, `sources.orm_scorer` and evaluation's `eval.orm_source` read) and
its optimizer; the progress holds the phase, the sampling chunk, the datasets'
digests and the data cursor. Everything random comes from (seed, split,
question index) or from the checkpointed TrainState, so a run killed at any
point and restarted with the same command ends with the uninterrupted run's
parameters and metrics; a finished run rerun does nothing.

With LoRA (`lora.rank` > 0) the ORM trains adapters and its head on the frozen
start: the checkpoint holds those (`orm.lora`), and `load_run` merges them onto
the start rebuilt from its recorded source.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from rl_reason import checkpointing
from rl_reason.algorithms import optimizer
from rl_reason.algorithms import orm as orm_lib
from rl_reason.algorithms.orm import measure, selection_score  # noqa: F401 (re-exported)
from rl_reason.algorithms import train_state as ts
from rl_reason.data import records, templates
from rl_reason.data.iterator import IndexIterator
from rl_reason.experiments import adapters, rollout, rounds, runs, sources, tasks
from rl_reason.experiments import config as config_lib
from rl_reason.experiments.config import InvalidConfigError, validate
from rl_reason.models import lora
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose

_log = logging.getLogger(__name__)

SAMPLE, TRAIN, DONE = "sample", "train", "done"
# "validation" (data.num_validation train questions held back) last, so that the
# other splits' draws are the same with or without it.
SPLITS = ("train", "heldout", "validation")
NAME = orm_lib.ORM_HEAD  # the checkpoint's model name and the head's
# What the sampled datasets depend on besides the seed, model and data (locked by
# runs.start): a resume that changes them would mix samples of two settings.
LOCKED_SECTIONS = ("orm", "eval", "sampling")


def validate_orm(config: ml_collections.ConfigDict) -> None:
    """Raises InvalidConfigError naming every problem of an ORM config before anything compiles."""
    from rl_reason.rewards import registry

    try:
        validate(config)
        problems = []
    except InvalidConfigError as e:
        problems = list(e.problems)
    problems += config_lib.lora_problems(config)
    c = config.orm
    if c.num_samples < 1 or config.eval.num_samples < 1:
        problems.append(
            "orm.num_samples and eval.num_samples must be positive: the ORM learns from"
            " samples and is measured on them."
        )
    chunk_key, chunk = config_lib.setting(config, "sampling.chunk")
    if chunk < 1 or c.num_shots < 0 or config.train.eval_every < 0:
        problems.append(
            f"{chunk_key} must be positive, orm.num_shots and train.eval_every not negative."
        )
    if c.balance_questions and (c.num_samples < 2 or c.one_sided_samples < 0):
        problems.append(
            "orm.balance_questions needs orm.num_samples >= 2 per question and"
            " orm.one_sided_samples >= 0."
        )
    if not c.lm_loss_weight >= 0:  # NaN too
        problems.append(f"orm.lm_loss_weight={c.lm_loss_weight} must be a number >= 0.")
    problems += [
        f"orm.rewards names {name!r}; known rewards: {registry.names()}."
        for name in c.rewards
        if name not in registry.names()
    ]
    if not config.model_source.path and config.model_source.kind != "gguf":
        problems.append(
            f"model_source.path is empty: give the policy to sample ({config.model_source.kind})."
        )
    if c.init_source.kind not in sources.MODEL_SOURCES:
        problems.append(
            f"orm.init_source.kind={c.init_source.kind!r}; known: {sorted(sources.MODEL_SOURCES)}."
        )
    try:
        shape = mesh_lib.resolve_mesh_shape(config.mesh.shape, jax.device_count())
        shards = math.prod(
            size for size, name in zip(shape, config.mesh.axis_names) if name in shd.BATCH_AXES
        )
    except ValueError:
        shards = 1  # validate() named the mesh's problem
    problems += [
        f"{key}={value} is not divisible by the mesh's {shards} batch shards."
        for key, value in (
            config_lib.setting(config, "sampling.batch_size"),
            ("orm.score_batch_size", c.score_batch_size),
        )
        if value < 1 or value % shards
    ]
    if problems:
        raise InvalidConfigError(problems)


def init_source(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(kind, path) of the model the ORM starts from: orm.init_source, or the policy
    when its path is empty."""
    source = config.orm.init_source
    if source.path:
        return source.kind, source.path
    return config.model_source.kind, config.model_source.path


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the ORM run to train.num_steps; returns the last logged metrics."""
    with runs.Run(config, workdir, validate_orm, locked=LOCKED_SECTIONS) as run:
        loop = _OrmRun(run)
        if loop.progress["phase"] == DONE:
            return run.finished(f"finished its {config.train.num_steps} ORM steps")
        run.begin(loop.tokenizer, loop.progress["global_step"])
        if loop.progress["phase"] == SAMPLE:
            loop.sample()
            loop.assemble()
        loop.start = None  # training needs only the ORM's state
        loop.train()
        return loop.last


class _OrmRun:
    """One ORM run's state between checkpoints, and its phases."""

    def __init__(self, run: runs.Run):
        config, mesh, rules = run.config, run.mesh, run.rules
        self.run, self.config, self.c = run, config, config.orm
        task = tasks.load(config)
        self.validation_questions = task.validation
        self.questions = {
            "train": task.train,
            "heldout": task.heldout[: config.eval.num_examples or None],
            "validation": task.validation,
        }
        self.splits = tuple(split for split in SPLITS if self.questions[split])
        self.selecting = "validation" in self.splits
        self.store = rollout.RecordStore(run.workdir, "orm")
        self.kind, self.path = init_source(config)
        self.start = sources.load_model(self.kind, self.path, mesh, rules)
        start_ids = sources.fingerprints(self.start.params)
        start_id = start_ids[0]
        changes = {"remat": config.train.remat} if config.train.remat else {}
        orm_model = sources.with_heads(
            self.start, (NAME,), mesh, rules, seed=config.seed, **changes
        )
        self.tokenizer = orm_model.tokenizer
        self.model = model = Transformer(orm_model.config)
        self.tx, self.schedule = optimizer.make_optimizer(config.optim, config.train.num_steps)
        # LoRA: the learner trains adapters and the head; the start is the state's base.
        self.lora = adapters.lora_config(config)
        self.learner = model
        if self.lora is not None:
            self.learner, self.tx = lora.LoraModel(model, self.lora), lora.lora_optimizer(self.tx)
            self._merged = lora.Merger(self.lora)
        abstract = ts.abstract_train_state(self.learner, self.tx, mesh, rules)
        restored = run.restore(self.items(abstract, self._kept(abstract.params)))
        if restored is not None:
            items, self.progress = restored
            if self.lora is None:
                self.state = checkpointing.merge_train_state(NAME, items)
            else:
                self.state = adapters.merge_state_items(items, orm_model.params, NAME)
            self.best_params = items.get(self._best_item)
            if self.progress["init"] not in start_ids:
                raise runs.ResumeConfigError(
                    f"The ORM's start model from {self.path!r} changed since the run began"
                    f" (checksum {start_id}, recorded {self.progress['init']})."
                )
        else:
            self.progress = {
                "phase": SAMPLE,
                "chunk": 0,
                "global_step": 0,
                "samples_drawn": 0,
                "init": start_id,
                "models": {NAME: model.config.to_dict()},
            }
            params = orm_model.params
            if self.lora is not None:  # what `sources.load_run` rebuilds the ORM from
                params = adapters.initial_params(
                    config, self.learner, params, jax.random.PRNGKey(config.seed)
                )
                self.progress["lora"] = adapters.record(
                    config, self.lora, start_id, source=(self.kind, self.path), model=NAME
                )
            self.state = ts.create_train_state(
                self.learner, self.tx, mesh, rules, config.seed, params=params
            )
            self.best_params = self._best_copy() if self.selecting else None
        self.last: dict[str, Any] = {}
        self._datasets: dict[str, tuple[records.Solution, ...]] = {}

    @property
    def _best_item(self) -> str:
        return "best.params" if self.lora is None else "best.lora"

    def _kept(self, params: Any) -> Any:
        """What the best ORM so far keeps of params: all, or under LoRA adapters and head."""
        return params if self.lora is None else lora.trained_part(params)

    def _best_copy(self) -> Any:
        return rounds.copy_tree(self._kept(self.state.params))

    def scored(self, params: Any) -> Any:
        """The plain params the scorer reads: `params`, or LoRA's merged."""
        return params if self.lora is None else self._merged(params)

    def items(self, state: Any, best_params: Any) -> dict[str, Any]:
        """What a checkpoint holds: the ORM's train state, and the best one so far."""
        if self.lora is None:
            items = checkpointing.train_state_items(NAME, state)
        else:
            items = adapters.state_items(state, NAME)
        return {**items, self._best_item: best_params} if self.selecting else items

    def log(self, record: dict[str, Any]) -> dict[str, Any]:
        return self.run.log(self.progress["global_step"], record)

    def advance(self, **changes: Any) -> None:
        self.progress.update(changes, global_step=self.progress["global_step"] + 1)

    def checkpoint(self, force: bool = False) -> None:
        self.run.checkpoint(
            self.progress["global_step"],
            self.items(self.state, self.best_params),
            self.progress,
            force=force,
            finished=self.progress["phase"] == DONE,
        )

    def sample(self) -> None:
        """Every train question's K samples, then every held-out (and validation) question's,
        chunk by chunk from progress["chunk"] (an index into all splits' chunks, in
        SPLITS' order), each saved, logged and checkpointed."""
        config, c, e = self.config, self.c, self.config.eval
        policy = self.start
        if (config.model_source.kind, config.model_source.path) != (self.kind, self.path):
            policy = sources.load_model(
                config.model_source.kind, config.model_source.path, self.run.mesh, self.run.rules
            )
        sampler = rollout.run_sampler(
            config,
            policy.config,
            policy.tokenizer,
            self.run.mesh,
            self.run.rules,
            progress=self.run.show_progress,
        )
        reward_fn = compose.compose(c.rewards.to_dict())
        exemplars = templates.select_exemplars(
            self.questions["train"], c.num_shots, seed=config.seed
        )
        base_rng = jax.random.PRNGKey(config.seed)
        offset = 0  # the split's first chunk in the progress' count
        for split in self.splits:
            questions = self.questions[split]
            # Validation samples are drawn like the held-out ones they stand for.
            k, temperature, tokens = (
                (c.num_samples, c.temperature, c.max_new_tokens)
                if split == "train"
                else (e.num_samples, e.temperature, e.max_new_tokens)
            )
            count = rollout.num_chunks(len(questions), config.sampling.chunk)
            start = self.progress["chunk"] - offset
            offset += count
            if start >= count:
                continue
            chunks = rollout.sample_chunks(
                sampler,
                policy.params,
                questions,
                [templates.format_prompt(q["question"], exemplars) for q in questions],
                jax.random.fold_in(base_rng, SPLITS.index(split)),
                rollout.ChunkSampling(
                    k, temperature, tokens, config.sampling.chunk, config.sampling.samples_per_call
                ),
                reward_fn,
                start=max(start, 0),
                desc=f"ORM: sampling {split}",
                show_progress=self.run.show_progress,
            )
            for chunk in chunks:
                samples = [
                    records.Solution(qid, chunk.prompts[i // k], text, float(reward), 0)
                    for i, (qid, text, reward) in enumerate(
                        zip(chunk.question_ids, chunk.texts, chunk.rewards.totals)
                    )
                ]
                self.store.write(self.store.chunk(split, chunk.index), samples)
                drawn = self.progress["samples_drawn"] + len(chunk.texts)
                self.advance(chunk=self.progress["chunk"] + 1, samples_drawn=drawn)
                positive = float(np.mean(np.asarray(chunk.rewards.totals) >= c.threshold))
                self.log(
                    {"split": split, "sample_positive_fraction": positive, "samples_drawn": drawn}
                )
                # Every chunk: sampling costs far more than a save, whatever the interval.
                self.checkpoint(force=True)

    def assemble(self) -> None:
        """Each split's chunks as one dataset file, its digest in the progress; training begins."""
        datasets = {}
        for split in self.splits:
            count = rollout.num_chunks(len(self.questions[split]), self.config.sampling.chunk)
            samples = self.store.read_chunks(split, count)
            self.store.write(self.store.dataset(split), samples)
            positive = [s.reward >= self.c.threshold for s in samples]
            datasets[split] = {
                "digest": records.dataset_digest(samples),
                "count": len(samples),
                "positive_fraction": float(np.mean(positive)),
            }
        self.advance(phase=TRAIN, datasets=datasets, orm_step=0, best={"score": None, "step": 0})
        self.last = self.log(
            {
                f"dataset/{split}_{key}": value
                for split, record in datasets.items()
                for key, value in record.items()
                if key != "digest"
            }
        )
        self.checkpoint(force=True)

    def train_set(self) -> list[records.Solution]:
        """The train samples the ORM learns from (balanced within questions if asked)."""
        c = self.c
        train_set = list(self.dataset("train"))
        if not c.balance_questions:
            return train_set
        keep = orm_lib.balanced_within_questions(  # the same subset on every resume
            [s.question_id for s in train_set],
            [float(s.reward >= c.threshold) for s in train_set],
            one_sided=c.one_sided_samples,
        )
        _log.info(
            "ORM: training on %d of %d samples (balanced within questions).",
            len(keep),
            len(train_set),
        )
        if len(keep) == 0:
            raise ValueError(
                "orm.balance_questions: no train question has both a right and a wrong"
                f" sample among its {c.num_samples}; draw more (orm.num_samples) or"
                " train on every sample."
            )
        return [train_set[i] for i in keep]

    def dataset(self, split: str) -> tuple[records.Solution, ...]:
        """A split's assembled samples, checked against the digest the checkpoint records."""
        if split not in self._datasets:
            digest = self.progress["datasets"][split]["digest"]
            self._datasets[split] = self.store.read(self.store.dataset(split), digest)
        return self._datasets[split]

    def train(self) -> None:
        """The ORM's steps from the checkpoint's on, measured every eval_every steps."""
        config, c, progress, mesh, rules = (
            self.config,
            self.c,
            self.progress,
            self.run.mesh,
            self.run.rules,
        )
        progress.setdefault("best", {"score": None, "step": 0})  # runs begun before selection
        train_set = self.train_set()
        arrays, cut = orm_lib.orm_arrays(
            self.tokenizer,
            [s.prompt for s in train_set],
            [s.completion for s in train_set],
            [float(s.reward >= c.threshold) for s in train_set],
            config.train.max_length,
        )
        if cut:
            _log.warning(
                "%d of %d ORM train samples are longer than train.max_length=%d; their ends"
                " are cut.",
                cut,
                len(train_set),
                config.train.max_length,
            )
        iterator = IndexIterator(len(train_set), config.train.batch_size, seed=config.seed)
        if "data" in progress:
            iterator.restore(progress["data"])
        step_fn = ts.jit_step(
            orm_lib.make_orm_step(
                self.learner,
                self.tx,
                num_microbatches=config.train.num_microbatches,
                lr_schedule=self.schedule,
                lm_weight=c.lm_loss_weight,
                chunk_size=config.train.loss_chunk_size,
            ),
            mesh,
            rules,
            ts.state_shardings(self.learner, self.tx, mesh, rules),
        )
        self.scorer = orm_lib.BatchedOrmScorer(
            self.model,
            None,
            self.tokenizer,
            batch_size=c.score_batch_size,
            length_buckets=(config.train.max_length,),
            mesh=mesh,
            rules=rules,
        )
        num_steps, eval_every = config.train.num_steps, config.train.eval_every
        for step in tqdm.trange(
            progress["orm_step"],
            num_steps,
            initial=progress["orm_step"],
            total=num_steps,
            desc=f"ORM: training on {len(train_set)} samples",
            disable=not self.run.show_progress,
        ):
            rows = next(iterator)
            batch = {key: value[rows] for key, value in arrays.items()}
            self.state, metrics = step_fn(self.state, shd.shard_batch(batch, mesh))
            metrics = jax.device_get(metrics)
            self.run.check_finite(metrics, f"ORM step {step + 1}")
            done = step + 1
            self.advance(orm_step=done, data=iterator.state())
            record = dict(metrics)
            measured = done == num_steps or (eval_every and done % eval_every == 0)
            if measured:
                record.update(self.measure(done, len(train_set)))
            if measured or done % config.train.log_every == 0:
                self.last = self.log({"orm_step": done, **record})
            if done == num_steps:
                self.select(done, len(train_set))
                progress["phase"] = DONE
            self.checkpoint(force=done == num_steps)

    def heldout_figures(self, split: str, params: Any) -> dict[str, float]:
        golds = [q["final_answer"] for q in self.questions[split]]
        scorer = dataclasses.replace(self.scorer, params=self.scored(params))
        return measure(scorer, self.dataset(split), golds, self.c.threshold)

    def measure(self, done: int, train_samples: int) -> dict[str, Any]:
        """The held-out (and validation) figures at step `done`; the best ORM so far kept."""
        out = {
            f"heldout/{k}": v for k, v in self.heldout_figures("heldout", self.state.params).items()
        }
        out.update(samples_drawn=self.progress["samples_drawn"], train_samples=train_samples)
        if self.selecting:
            valid = self.heldout_figures("validation", self.state.params)
            out.update({f"validation/{k}": v for k, v in valid.items()})
            score, best = selection_score(valid), self.progress["best"]["score"]
            if score is not None and (best is None or score > best):
                self.best_params = self._best_copy()
                self.progress["best"] = {"score": score, "step": done}
        return out

    def select(self, done: int, train_samples: int) -> None:
        """The ORM with the best validation score becomes the run's, measured once more."""
        best = self.progress["best"]
        if not self.selecting or best["score"] is None:
            return
        params = rounds.copy_tree(self.best_params)
        if self.lora is not None:
            params = lora.with_trained_part(self.state.params["base"], params)
        self.state = self.state.replace(params=params)
        held = self.heldout_figures("heldout", self.state.params)
        self.progress["global_step"] += 1
        self.last = self.log(
            {
                "orm_step": done,
                "samples_drawn": self.progress["samples_drawn"],
                "train_samples": train_samples,
                "selected_step": best["step"],
                "selected_validation_score": best["score"],
                **{f"selected/heldout/{k}": v for k, v in held.items()},
            }
        )

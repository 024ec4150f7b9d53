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
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from rl_reason import checkpointing
from rl_reason import logging as run_logging
from rl_reason.algorithms import expert_iteration as ei
from rl_reason.algorithms import optimizer
from rl_reason.algorithms import orm as orm_lib
from rl_reason.algorithms import train_state as ts
from rl_reason.data import templates
from rl_reason.data.iterator import IndexIterator
from rl_reason.evaluation.evaluate import evaluate as score_samples
from rl_reason.experiments import rollout, rounds, runs, sources, tasks
from rl_reason.experiments.config import InvalidConfigError, validate
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose
from rl_reason.sampling.engine import Sampler, common_prefix_length

_log = logging.getLogger(__name__)

SAMPLE, TRAIN, DONE = "sample", "train", "done"
# "validation" (data.num_validation train questions held back) last, so that the
# other splits' draws are the same with or without it.
SPLITS = ("train", "heldout", "validation")
NAME = orm_lib.ORM_HEAD  # the checkpoint's model name and the head's
# What the sampled datasets depend on besides the seed, model and data (locked by
# runs.start): a resume that changes them would mix samples of two settings.
LOCKED_SECTIONS = ("orm", "eval")


class _Files:
    """The run's labelled samples: per-chunk files and each split's assembled dataset."""

    def __init__(self, workdir: str):
        self.root = os.path.join(workdir, "orm")

    def chunk(self, split: str, index: int) -> str:
        return os.path.join(self.root, split, f"chunk_{index:05d}.jsonl")

    def dataset(self, split: str) -> str:
        return os.path.join(self.root, f"{split}.jsonl")


def validate_orm(config: ml_collections.ConfigDict) -> None:
    """Raises InvalidConfigError naming every problem of an ORM config before anything compiles."""
    from rl_reason.rewards import registry

    try:
        validate(config)
        problems = []
    except InvalidConfigError as e:
        problems = list(e.problems)
    c = config.orm
    if c.num_samples < 1 or config.eval.num_samples < 1:
        problems.append(
            "orm.num_samples and eval.num_samples must be positive: the ORM learns from"
            " samples and is measured on them."
        )
    if c.sampling_chunk < 1 or c.num_shots < 0 or config.train.eval_every < 0:
        problems.append(
            "orm.sampling_chunk must be positive, orm.num_shots and train.eval_every not negative."
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
        f"orm.{key}={c[key]} is not divisible by the mesh's {shards} batch shards."
        for key in ("sampling_batch_size", "score_batch_size")
        if c[key] < 1 or c[key] % shards
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


def measure(
    scorer: orm_lib.BatchedOrmScorer,
    samples: Sequence[ei.Solution],
    golds: Sequence[str],
    threshold: float,
) -> dict[str, float]:
    """The ORM's held-out figures on K samples per question (question-major, K equal).

    auc over all samples and within_question_auc over pairs of one question's
    samples (each omitted when undefined: a class missing), accuracy of the
    score at 0.5 against the labels, the labels' positive fraction, the mean
    score, and evaluation's metrics of the same samples with the scores:
    rerank@K beside maj@K and pass@K (maj@1 and pass@1 read each question's
    first sample). The overall AUC also rewards knowing which questions are
    hard; rerank@K gains only from the within-question one.
    """
    texts = [s.completion for s in samples]
    rows = scorer(texts, {"prompt": [s.prompt for s in samples]}, [[len(t)] for t in texts])
    scores = np.asarray([row[0] for row in rows], np.float64)
    labels = np.asarray([s.reward >= threshold for s in samples])
    out = {
        "accuracy": float(np.mean((scores > 0.5) == labels)),
        "positive_fraction": float(labels.mean()),
        "mean_score": float(scores.mean()),
    }
    k = len(samples) // len(golds)
    if k * len(golds) != len(samples):
        raise ValueError(f"{len(samples)} samples for {len(golds)} questions: K is not whole")
    if 0 < labels.sum() < labels.size:
        out["auc"] = orm_lib.roc_auc(scores, labels)
        if any(0 < row.sum() < k for row in labels.reshape(-1, k)):
            out["within_question_auc"] = orm_lib.within_group_auc(scores, labels, k)
    grouped = [texts[i : i + k] for i in range(0, len(texts), k)]
    grouped_scores = [scores[i : i + k].tolist() for i in range(0, len(texts), k)]
    out.update(score_samples(grouped, golds, scores=grouped_scores))
    return out


def selection_score(figures: dict[str, float]) -> float | None:
    """What picks the run's ORM on the validation samples: the within-question AUC
    (the overall AUC when no validation question has both outcomes; None when
    neither is defined)."""
    return figures.get("within_question_auc", figures.get("auc"))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the ORM run to train.num_steps; returns the last logged metrics."""
    mesh, rules = runs.start(config, workdir, validate_orm)
    runs.check_resume_config(config, workdir, LOCKED_SECTIONS)
    c = config.orm
    task = tasks.load(config)
    heldout = task.heldout[: config.eval.num_examples or None]
    questions = {"train": task.train, "heldout": heldout, "validation": task.validation}
    splits = tuple(split for split in SPLITS if questions[split])
    selecting = "validation" in splits
    files = _Files(workdir)

    kind, path = init_source(config)
    start = sources.load_model(kind, path, mesh, rules)
    start_id = sources.checksum(start.params)
    changes = {"remat": config.train.remat} if config.train.remat else {}
    orm_model = sources.with_heads(start, (NAME,), mesh, rules, seed=config.seed, **changes)
    tokenizer = orm_model.tokenizer
    model = Transformer(orm_model.config)
    tx, schedule = optimizer.make_optimizer(config.optim, config.train.num_steps)
    checkpointer = runs.make_checkpointer(config, workdir)

    def items_of(state: Any, best_params: Any) -> dict[str, Any]:
        """What a checkpoint holds: the ORM's train state, and the best one so far."""
        items = checkpointing.train_state_items(NAME, state)
        return {**items, "best.params": best_params} if selecting else items

    if checkpointer.latest_step() is not None:
        abstract = ts.abstract_train_state(model, tx, mesh, rules)
        items, progress, _ = checkpointer.restore(items_of(abstract, abstract.params))
        state = checkpointing.merge_train_state(NAME, items)
        best_params = items.get("best.params")
        if progress["init"] != start_id:
            raise runs.ResumeConfigError(
                f"The ORM's start model from {path!r} changed since the run began"
                f" (checksum {start_id}, recorded {progress['init']})."
            )
    else:
        progress = {
            "phase": SAMPLE,
            "chunk": 0,
            "global_step": 0,
            "samples_drawn": 0,
            "init": start_id,
            "models": {NAME: model.config.to_dict()},
        }
        state = ts.create_train_state(model, tx, mesh, rules, config.seed, params=orm_model.params)
        best_params = rounds.copy_tree(state.params) if selecting else None
    del orm_model
    if progress["phase"] == DONE:  # a finished run is left as it is, config.json included
        checkpointer.close()
        print(
            f"The ORM run in {workdir} finished its {config.train.num_steps} steps; nothing to do."
        )
        return runs.finished_record(workdir)
    runs.write_run_record(config, workdir, tokenizer)

    writer = run_logging.MetricWriter(
        workdir, tensorboard=config.logging.tensorboard, resume_step=progress["global_step"]
    )
    show = config.logging.progress_bar and jax.process_index() == 0
    last: dict[str, Any] = {}

    def log(record: dict[str, Any]) -> dict[str, Any]:
        return writer.write(progress["global_step"], record)

    try:
        with checkpointing.PreemptionGuard() as guard:

            def checkpoint_and_maybe_stop(force: bool = False) -> None:
                stop = guard.should_stop(progress["global_step"])
                items = items_of(state, best_params)
                checkpointer.save(progress["global_step"], items, progress, force=force or stop)
                if stop and progress["phase"] != DONE:  # a finished run has nothing to resume
                    raise checkpointing.Preempted(progress["global_step"], workdir)

            if progress["phase"] == SAMPLE:
                policy = start
                if (config.model_source.kind, config.model_source.path) != (kind, path):
                    policy = sources.load_model(
                        config.model_source.kind, config.model_source.path, mesh, rules
                    )
                del start  # training needs only the ORM's state
                _sample(
                    config,
                    {split: questions[split] for split in splits},
                    policy,
                    mesh,
                    rules,
                    files,
                    progress,
                    log,
                    checkpoint_and_maybe_stop,
                    show,
                )
                del policy
                datasets = {}
                for split in splits:
                    chunks = range(0, len(questions[split]), c.sampling_chunk)
                    samples = [
                        s
                        for i in range(len(chunks))
                        for s in runs.read_solutions(files.chunk(split, i))
                    ]
                    runs.write_solutions(files.dataset(split), samples)
                    positive = [s.reward >= c.threshold for s in samples]
                    datasets[split] = {
                        "digest": ei.dataset_digest(samples),
                        "count": len(samples),
                        "positive_fraction": float(np.mean(positive)),
                    }
                progress.update(
                    phase=TRAIN,
                    datasets=datasets,
                    orm_step=0,
                    best={"score": None, "step": 0},
                    global_step=progress["global_step"] + 1,
                )
                last = log(
                    {
                        f"dataset/{split}_{key}": value
                        for split, record in datasets.items()
                        for key, value in record.items()
                        if key != "digest"
                    }
                )
                checkpoint_and_maybe_stop(force=True)
            else:
                del start

            # The train phase.
            progress.setdefault("best", {"score": None, "step": 0})  # runs begun before selection
            train_set, heldout_set, validation_set = (
                runs.read_solutions(files.dataset(split), progress["datasets"][split]["digest"])
                if split in splits
                else []
                for split in SPLITS
            )
            if c.balance_questions:  # the same subset on every resume: a pure function
                keep = orm_lib.balanced_within_questions(
                    [s.question_id for s in train_set],
                    [float(s.reward >= c.threshold) for s in train_set],
                    one_sided=c.one_sided_samples,
                )
                _log.info(
                    "ORM: training on %d of %d samples (balanced within questions).",
                    len(keep),
                    len(train_set),
                )
                train_set = [train_set[i] for i in keep]
                if not train_set:
                    raise ValueError(
                        "orm.balance_questions: no train question has both a right and a wrong"
                        f" sample among its {c.num_samples}; draw more (orm.num_samples) or"
                        " train on every sample."
                    )
            arrays, cut = orm_lib.orm_arrays(
                tokenizer,
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
                    model,
                    tx,
                    num_microbatches=config.train.num_microbatches,
                    lr_schedule=schedule,
                    lm_weight=c.lm_loss_weight,
                    chunk_size=config.train.loss_chunk_size,
                ),
                mesh,
                rules,
                ts.state_shardings(model, tx, mesh, rules),
            )
            scorer = orm_lib.BatchedOrmScorer(
                model,
                None,
                tokenizer,
                batch_size=c.score_batch_size,
                length_buckets=(config.train.max_length,),
                mesh=mesh,
                rules=rules,
            )
            golds = [q["final_answer"] for q in heldout]
            validation_golds = [q["final_answer"] for q in task.validation]
            num_steps, eval_every = config.train.num_steps, config.train.eval_every
            for step in tqdm.trange(
                progress["orm_step"],
                num_steps,
                initial=progress["orm_step"],
                total=num_steps,
                desc=f"ORM: training on {len(train_set)} samples",
                disable=not show,
            ):
                rows = next(iterator)
                batch = {key: value[rows] for key, value in arrays.items()}
                state, metrics = step_fn(state, shd.shard_batch(batch, mesh))
                metrics = jax.device_get(metrics)
                runs.check_finite(metrics, f"ORM step {step + 1}", checkpointer.latest_step())
                done = step + 1
                progress.update(
                    orm_step=done, data=iterator.state(), global_step=progress["global_step"] + 1
                )
                record = dict(metrics)
                measured = done == num_steps or (eval_every and done % eval_every == 0)
                if measured:
                    scorer = dataclasses.replace(scorer, params=state.params)
                    held = measure(scorer, heldout_set, golds, c.threshold)
                    record.update({f"heldout/{key}": value for key, value in held.items()})
                    record["samples_drawn"] = progress["samples_drawn"]
                    record["train_samples"] = len(train_set)
                    if selecting:
                        valid = measure(scorer, validation_set, validation_golds, c.threshold)
                        record.update({f"validation/{k}": v for k, v in valid.items()})
                        score, best = selection_score(valid), progress["best"]["score"]
                        if score is not None and (best is None or score > best):
                            best_params = rounds.copy_tree(state.params)
                            progress["best"] = {"score": score, "step": done}
                if measured or done % config.train.log_every == 0:
                    last = log({"orm_step": done, **record})
                if done == num_steps:
                    if selecting and progress["best"]["score"] is not None:
                        # The selected ORM becomes the run's, measured once more.
                        state = state.replace(params=rounds.copy_tree(best_params))
                        scorer = dataclasses.replace(scorer, params=state.params)
                        held = measure(scorer, heldout_set, golds, c.threshold)
                        progress["global_step"] += 1
                        last = log(
                            {
                                "orm_step": done,
                                "samples_drawn": progress["samples_drawn"],
                                "train_samples": len(train_set),
                                "selected_step": progress["best"]["step"],
                                "selected_validation_score": progress["best"]["score"],
                                **{f"selected/heldout/{k}": v for k, v in held.items()},
                            }
                        )
                    progress["phase"] = DONE
                checkpoint_and_maybe_stop(force=done == num_steps)
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    return last


def _sample(config, questions, policy, mesh, rules, files, progress, log, checkpoint, show) -> None:
    """Every train question's K samples, then every held-out (and validation) question's,
    chunk by chunk from progress["chunk"] (an index into all splits' chunks, in
    `questions`' order: train first)."""
    c = config.orm
    sampler = Sampler(
        policy.config,
        policy.tokenizer,
        batch_size=c.sampling_batch_size,
        prompt_buckets=tuple(c.prompt_buckets),
        mesh=mesh,
        rules=rules,
        stop_strings=templates.STOP_SEQUENCES,
        progress=show,
    )
    reward_fn = compose.compose(c.rewards.to_dict())
    exemplars = templates.select_exemplars(questions["train"], c.num_shots, seed=config.seed)
    base_rng = jax.random.PRNGKey(config.seed)
    e = config.eval  # validation samples are drawn like the held-out ones they stand for
    settings = {  # split -> (questions, K, temperature, max_new_tokens)
        split: (questions[split], c.num_samples, c.temperature, c.max_new_tokens)
        if split == "train"
        else (questions[split], e.num_samples, e.temperature, e.max_new_tokens)
        for split in questions
    }
    plan = [
        (split, index, first)
        for split in questions
        for index, first in enumerate(range(0, len(settings[split][0]), c.sampling_chunk))
    ]
    prompts = {
        split: [templates.format_prompt(q["question"], exemplars) for q in settings[split][0]]
        for split in questions
    }
    shared = {split: common_prefix_length(sampler.token_ids(p)) for split, p in prompts.items()}
    for n in tqdm.trange(
        progress["chunk"],
        len(plan),
        initial=progress["chunk"],
        total=len(plan),
        desc="ORM: sampling",
        disable=not show,
    ):
        split, index, first = plan[n]
        all_questions, k, temperature, max_new_tokens = settings[split]
        questions = all_questions[first : first + c.sampling_chunk]
        chunk_prompts = prompts[split][first : first + c.sampling_chunk]
        texts = rollout.sample_k(
            sampler,
            policy.params,
            chunk_prompts,
            jax.random.fold_in(base_rng, SPLITS.index(split)),
            num_samples=k,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            samples_per_call=c.samples_per_call,
            prompt_offset=first,
            prefix_length=shared[split],
        )
        rewards = reward_fn(texts, rollout.columns_k(questions, k))
        samples = [
            ei.Solution(
                question_id=first + i // k,
                prompt=chunk_prompts[i // k],
                completion=text,
                reward=float(reward),
                round=0,
            )
            for i, (text, reward) in enumerate(zip(texts, rewards.totals))
        ]
        runs.write_solutions(files.chunk(split, index), samples)
        progress.update(
            chunk=n + 1,
            global_step=progress["global_step"] + 1,
            samples_drawn=progress["samples_drawn"] + len(texts),
        )
        log(
            {
                "split": split,
                "sample_positive_fraction": float(
                    np.mean(np.asarray(rewards.totals) >= c.threshold)
                ),
                "samples_drawn": progress["samples_drawn"],
            }
        )
        # Every chunk: sampling costs far more than a save, whatever the interval.
        checkpoint(force=True)

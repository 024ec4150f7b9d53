"""Expert Iteration (the study's best performer): sample, keep the correct, fine-tune, repeat.

Round r:
  1. sample  -- K solutions for every train question from the policy chosen
     at the end of round r-1 (the start model in round 0), in chunks of
     `ei.sampling_chunk` questions; each chunk's correct, answer-cut samples
     go to `ei/round_<r>/chunk_<c>.jsonl` and a checkpoint records the chunk.
  2. accumulate -- D_r = D_{r-1} ∪ R_r, deduplicated per question, written to
     `ei/dataset_round_<r>.jsonl` (checksummed; its digest is in the checkpoint).
  3. train -- `sft_step` on D_r for `ei.steps_per_round` steps, from the
     INITIAL model each round (the study's choice; `ei.restart_from_initial=False`
     continues from the last round's), with a fresh optimizer; validation
     maj@1 every `ei.eval_every` steps picks the round's checkpoint (early
     stopping), kept as the `best` item.
  4. the chosen model is measured on the held-out questions (maj@1, maj@K,
     pass@K) beside the count of samples drawn so far: the study's x-axis.

The checkpoint step is a global counter that rises with every sampling chunk
and every SFT step. Everything random comes from (seed, round, question index)
or from the checkpointed TrainState, so a run killed at any point, mid-sampling
or mid-training, and restarted with the same command ends with the same
parameters and metrics as an uninterrupted run.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from rl_reason import checkpointing
from rl_reason import logging as run_logging
from rl_reason.algorithms import expert_iteration as ei
from rl_reason.algorithms import optimizer
from rl_reason.algorithms import train_state as ts
from rl_reason.data import templates
from rl_reason.experiments import rollout, rounds, runs, sources, tasks
from rl_reason.experiments import sft as sft_experiment
from rl_reason.experiments.config import InvalidConfigError
from rl_reason.models.transformer import Transformer
from rl_reason.rewards import compose
from rl_reason.sampling.engine import Sampler

_log = logging.getLogger(__name__)

SAMPLE, TRAIN = "sample", "train"


def validate_ei(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming every problem of an EI config before anything compiles."""
    from rl_reason.rewards import registry

    c, problems = config.ei, []
    if c.num_rounds < 1 or c.num_samples < 1 or c.steps_per_round < 1:
        problems.append("ei.num_rounds, ei.num_samples and ei.steps_per_round must be positive.")
    if c.eval_every < 1:
        problems.append("ei.eval_every must be positive: validation picks each round's checkpoint.")
    if config.data.get("num_validation", 0) < 1:
        problems.append("data.num_validation must be positive: validation maj@1 picks checkpoints.")
    problems += [
        f"ei.rewards names {name!r}; known rewards: {registry.names()}."
        for name in c.rewards
        if name not in registry.names()
    ]
    if not config.model_source.path and config.model_source.kind != "gguf":
        problems.append(
            f"model_source.path is empty: give the start model ({config.model_source.kind})."
        )
    if problems:
        raise InvalidConfigError(problems)


_copy = rounds.copy_tree


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) Expert Iteration to ei.num_rounds; returns the last logged metrics."""
    mesh, rules = runs.start(config, workdir, validate_ei)
    c = config.ei
    task = tasks.load(config)
    files = rounds.RoundFiles(workdir)

    start = sources.load_model(config.model_source.kind, config.model_source.path, mesh, rules)
    if config.train.remat:  # recomputation changes no parameter, only what the step keeps
        start = start._replace(config=start.config.replace(remat=config.train.remat))
    tokenizer = start.tokenizer
    model = Transformer(start.config)
    initial_id = sources.checksum(start.params)
    tx, schedule = optimizer.make_optimizer(config.optim, c.steps_per_round)
    checkpointer = runs.make_checkpointer(config, workdir)
    abstract_state = ts.abstract_train_state(model, tx, mesh, rules)
    if checkpointer.latest_step() is not None:
        targets = {
            **checkpointing.train_state_items("policy", abstract_state),
            "best.params": abstract_state.params,
        }
        items, progress, _ = checkpointer.restore(targets)
        state = checkpointing.merge_train_state("policy", items)
        best_params = items["best.params"]
        if progress["initial"] != initial_id:
            raise runs.ResumeConfigError(
                f"The start model from {config.model_source.path!r} changed since the run began"
                f" (checksum {initial_id}, recorded {progress['initial']})."
            )
    else:
        progress = {
            "round": 0,
            "phase": SAMPLE,
            "chunk": 0,
            "global_step": 0,
            "samples_drawn": 0,
            "initial": initial_id,
            "dataset": {"round": -1, "digest": ei.dataset_digest(()), "count": 0},
            "models": {"policy": model.config.to_dict()},
        }
        state = ts.create_train_state(model, tx, mesh, rules, config.seed, params=start.params)
        best_params = _copy(start.params)
    initial_params = start.params
    del start
    if progress["round"] >= c.num_rounds:  # a finished run is left as it is, config.json included
        checkpointer.close()
        print(f"The run in {workdir} finished its {c.num_rounds} rounds; nothing to do.")
        return runs.finished_record(workdir)
    runs.write_run_record(config, workdir, tokenizer)

    sampler = Sampler(
        model.config,
        tokenizer,
        batch_size=c.sampling_batch_size,
        prompt_buckets=tuple(c.prompt_buckets),
        mesh=mesh,
        rules=rules,
        stop_strings=templates.STOP_SEQUENCES,
        progress=config.logging.progress_bar and jax.process_index() == 0,
    )
    reward_fn = compose.compose(c.rewards.to_dict())
    step_fn = sft_experiment.jit_sft_step(config, model, tx, schedule, mesh, rules)
    writer = run_logging.MetricWriter(
        workdir,
        tensorboard=config.logging.tensorboard,
        resume_step=progress["global_step"] or None,  # None: a fresh run
    )
    exemplars = templates.select_exemplars(task.train, c.first_round_shots, seed=config.seed)
    last: dict[str, Any] = {}

    def save(force: bool) -> None:
        items = {
            **checkpointing.train_state_items("policy", state),
            "best.params": best_params,
        }
        checkpointer.save(progress["global_step"], items, progress, force=force)

    def log(record: dict[str, Any]) -> dict[str, Any]:
        return writer.write(progress["global_step"], {"round": progress["round"], **record})

    base_rng = jax.random.PRNGKey(config.seed)
    try:
        with checkpointing.PreemptionGuard() as guard:

            def checkpoint_and_maybe_stop(force: bool = False) -> None:
                stop = guard.should_stop(progress["global_step"])
                save(force or stop)
                # A finished run (last round done) has nothing to resume.
                if stop and progress["round"] < c.num_rounds:
                    raise checkpointing.Preempted(progress["global_step"], workdir)

            if config.eval.at_start and not progress.get("start_evaluated"):
                # The start model as round 0 samples it (with its few-shot prompt).
                heldout = rollout.evaluate_heldout(
                    sampler,
                    best_params,
                    task.heldout,
                    config.eval,
                    jax.random.fold_in(base_rng, 9_999),
                    exemplars=exemplars,
                )
                last = log({**{f"heldout/{k}": v for k, v in heldout.items()}, "samples_drawn": 0})
                progress.update(start_evaluated=True, global_step=progress["global_step"] + 1)
                checkpoint_and_maybe_stop(force=True)

            while progress["round"] < c.num_rounds:
                r = progress["round"]
                if progress["phase"] == SAMPLE:
                    shots = exemplars if r == 0 else ()
                    prompts = [templates.format_prompt(q["question"], shots) for q in task.train]
                    stored = [templates.format_prompt(q["question"]) for q in task.train]
                    for chunk in rounds.sample_chunks(
                        sampler,
                        best_params,
                        task.train,
                        prompts,
                        jax.random.fold_in(base_rng, r),
                        c,
                        reward_fn,
                        start=progress["chunk"],
                        desc=f"EI round {r}: sampling",
                        show_progress=config.logging.progress_bar,
                    ):
                        qids, rewards = chunk.question_ids, chunk.rewards
                        kept = ei.select_correct(
                            qids,
                            [stored[i] for i in qids],
                            chunk.texts,
                            rewards.totals,
                            round=r,
                            threshold=c.threshold,
                        )
                        files.write(files.chunk(r, chunk.index), kept)
                        progress.update(
                            chunk=chunk.index + 1,
                            global_step=progress["global_step"] + 1,
                            samples_drawn=progress["samples_drawn"] + len(chunk.texts),
                        )
                        log(
                            {
                                "sample_accuracy": float(
                                    np.mean(np.asarray(rewards.totals) >= c.threshold)
                                ),
                                "kept": len(kept),
                                "samples_drawn": progress["samples_drawn"],
                            }
                        )
                        # Every chunk: sampling costs far more than a save, whatever the interval.
                        checkpoint_and_maybe_stop(force=True)
                    dataset, summary = rounds.accumulate_round(
                        files,
                        progress,
                        r,
                        rounds.num_chunks(len(prompts), c.sampling_chunk),
                        c.max_per_question,
                    )
                    progress.update(
                        phase=TRAIN,
                        sft_step=0,
                        best={"maj@1": -1.0, "step": 0},
                        dataset={
                            "round": r,
                            "digest": ei.dataset_digest(dataset),
                            "count": len(dataset),
                        },
                        global_step=progress["global_step"] + 1,
                    )
                    progress.pop("data", None)
                    source_params = initial_params if c.restart_from_initial else best_params
                    state = ts.create_train_state(
                        model, tx, mesh, rules, config.seed + r, params=_copy(source_params)
                    )
                    last = log({**{f"dataset/{k}": v for k, v in summary.as_dict().items()}})
                    checkpoint_and_maybe_stop(force=True)

                # The train phase.
                dataset = files.read(files.dataset(r), progress["dataset"]["digest"])
                if not dataset:  # nothing kept: the round's model stays the one it sampled with
                    _log.warning("EI round %d kept no solution; it trains nothing.", r)
                else:
                    arrays, cut = ei.sft_arrays(tokenizer, dataset, config.train.max_length)
                    if cut:
                        _log.warning(
                            "%d of %d EI solutions are longer than train.max_length.",
                            cut,
                            len(dataset),
                        )
                    steps = rounds.train_steps(
                        step_fn,
                        state,
                        best_params,
                        arrays,
                        progress,
                        config,
                        c,
                        round_=r,
                        validate=lambda params: rounds.greedy_accuracy(
                            sampler, params, task.validation, c
                        ),
                        mesh=mesh,
                        last_checkpoint=checkpointer.latest_step,
                        name="EI",
                    )
                    for state, best_params, record in steps:  # what save() writes, step by step
                        if record is not None:
                            last = log(record)
                        checkpoint_and_maybe_stop(force=progress["sft_step"] == c.steps_per_round)

                heldout = rollout.evaluate_heldout(
                    sampler,
                    best_params,
                    task.heldout,
                    config.eval,
                    jax.random.fold_in(base_rng, 10_000 + r),
                )
                progress.update(
                    round=r + 1, phase=SAMPLE, chunk=0, global_step=progress["global_step"] + 1
                )
                last = log(
                    {
                        **{f"heldout/{k}": v for k, v in heldout.items()},
                        "samples_drawn": progress["samples_drawn"],
                        "selected_step": progress["best"]["step"],
                        "selected_validation_maj@1": progress["best"]["maj@1"],
                        "dataset_size": progress["dataset"]["count"],
                    }
                )
                # The selected model becomes the policy: what sampling and evaluation read.
                state = state.replace(params=_copy(best_params))
                checkpoint_and_maybe_stop(force=True)
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    return last

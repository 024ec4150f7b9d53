"""Return-Conditioned RL (RCRL), online in Expert Iteration's rounds.

At the start the return tokens (`<|good|>`, `<|bad|>`) join the start model's
tokenizer and embedding (new rows the mean of the existing ones; the grown
vocabulary is in the model config every checkpoint records). Round r:
  1. sample  -- K solutions for every train question from the policy chosen at
     the end of round r-1, in chunks of `rcrl.sampling_chunk` questions; the
     prompts of round 0 are the start model's own (it has never seen a return
     token), those of later rounds carry `<|good|>` where the solution starts.
     Every sample is labelled with its return (sparse: correctness of the
     final answer; dense: the step rewards, one label per step), cut after
     its answer, and written to `rcrl/round_<r>/chunk_<c>.jsonl`; a
     checkpoint records the chunk.
  2. accumulate -- D_r = D_{r-1} ∪ (round r's samples), deduplicated per
     question, to `rcrl/dataset_round_<r>.jsonl` (checksummed; its digest is
     in the checkpoint). Good and bad samples alike: that is RCRL's point.
  3. train -- `sft_step` on D_r with the return tokens in the prompts (dense:
     before every step) and out of the loss, for `rcrl.steps_per_round`
     steps; validation maj@1 conditioned on `<|good|>` every
     `rcrl.eval_every` steps picks the round's checkpoint.
  4. the chosen model is measured on the held-out questions conditioned on
     `<|good|>` (maj@1, maj@K, pass@K) and, greedily, on `<|bad|>`, beside the
     count of samples drawn so far.
Dense mode conditions every step, not only the first: after each line the
sampler gives the model the token (`rcrl.step_conditioning`), as in training.

The token to condition on is recorded in every checkpoint's progress
(`prompt_conditioning`; `step_conditioning` for dense runs), so that
`launch/evaluate.py` on an RCRL run applies it by itself. The checkpoint
step is a global counter that rises with every sampling chunk and every SFT
step; a run killed at any point and restarted with the same command ends
with the parameters and metrics of an uninterrupted run (the shared round
machinery is `experiments/rounds.py`).
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
from rl_reason.algorithms import optimizer, rcrl
from rl_reason.algorithms import train_state as ts
from rl_reason.data import templates
from rl_reason.experiments import rollout, rounds, runs, sources, tasks
from rl_reason.experiments import sft as sft_experiment
from rl_reason.experiments.config import InvalidConfigError
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose
from rl_reason.sampling.engine import Sampler

_log = logging.getLogger(__name__)

SAMPLE, TRAIN = "sample", "train"
GOOD, BAD = rcrl.GOOD, rcrl.BAD


def validate_rcrl(config: ml_collections.ConfigDict) -> None:
    """Raises InvalidConfigError naming every problem of an RCRL config before anything compiles."""
    from rl_reason.rewards import registry

    c, problems = config.rcrl, []
    if c.num_rounds < 1 or c.num_samples < 1 or c.steps_per_round < 1:
        problems.append(
            "rcrl.num_rounds, rcrl.num_samples and rcrl.steps_per_round must be positive."
        )
    if c.eval_every < 1:
        problems.append("rcrl.eval_every must be positive: validation picks each round's model.")
    if not c.return_token_lr_scale > 0:
        problems.append("rcrl.return_token_lr_scale must be positive.")
    if c.mode not in rcrl.MODES:
        problems.append(f"rcrl.mode={c.mode!r} not in {rcrl.MODES}.")
    if config.data.get("num_validation", 0) < 1:
        problems.append("data.num_validation must be positive: validation maj@1 picks models.")
    for section in ("rewards", "step_rewards"):
        problems += [
            f"rcrl.{section} names {name!r}; known rewards: {registry.names()}."
            for name in c[section]
            if name not in registry.names()
        ]
    if not config.model_source.path and config.model_source.kind != "gguf":
        problems.append(
            f"model_source.path is empty: give the start model ({config.model_source.kind})."
        )
    if problems:
        raise InvalidConfigError(problems)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) RCRL to rcrl.num_rounds; returns the last logged metrics."""
    mesh, rules = runs.start(config, workdir, validate_rcrl)
    c = config.rcrl
    task = tasks.load(config)
    files = rounds.RoundFiles(workdir, "rcrl", rcrl.RcrlSample)

    start = sources.load_model(config.model_source.kind, config.model_source.path, mesh, rules)
    if config.train.remat:  # recomputation changes no parameter, only what the step keeps
        start = start._replace(config=start.config.replace(remat=config.train.remat))
    initial_id = sources.checksum(start.params)
    # The return tokens, once: every round, resume and evaluation sees the same ids and rows.
    tokenizer, params, model_config = rcrl.add_return_tokens(
        start.tokenizer, start.params, start.config
    )
    model = Transformer(model_config)
    initial_params = jax.device_put(params, ts.param_shardings(model, mesh, rules))
    token_ids = dict(zip((GOOD, BAD), rcrl.return_token_ids(tokenizer)))
    del start, params

    tx, schedule = optimizer.make_optimizer(
        config.optim,
        c.steps_per_round,
        embedding_row_scales={i: c.return_token_lr_scale for i in token_ids.values()},
    )
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
        if progress["return_tokens"] != token_ids:
            raise runs.ResumeConfigError(
                f"The return tokens' ids {token_ids} differ from the run's"
                f" {progress['return_tokens']} (the start model's tokenizer changed)."
            )
    else:
        progress = {
            "round": 0,
            "phase": SAMPLE,
            "chunk": 0,
            "global_step": 0,
            "samples_drawn": 0,
            "start_evaluated": not config.eval.at_start,
            "initial": initial_id,
            "dataset": {"round": -1, "digest": ei.dataset_digest(()), "count": 0},
            "models": {"policy": model.config.to_dict()},
            "return_tokens": token_ids,
            # What evaluation conditions the policy's prompts on: nothing until the
            # policy is a model trained with return tokens (dense: every step too).
            "prompt_conditioning": {"policy": ""},
            "step_conditioning": {"policy": c.mode == "dense"},
        }
        state = ts.create_train_state(
            model, tx, mesh, rules, config.seed, params=rounds.copy_tree(initial_params)
        )
        best_params = rounds.copy_tree(initial_params)
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
    step_reward_fn = compose.compose(c.step_rewards.to_dict()) if c.mode == "dense" else None
    threshold = c.threshold if c.mode == "sparse" else c.step_threshold  # what labels the tokens
    # A dense model learnt every step after its step's token: it is asked for good steps.
    every_step = c.mode == "dense"
    label_thresholds = {
        "threshold": c.threshold,
        "step_threshold": c.step_threshold if c.mode == "dense" else None,
    }
    step_fn = sft_experiment.jit_sft_step(config, model, tx, schedule, mesh, rules)
    writer = run_logging.MetricWriter(
        workdir, tensorboard=config.logging.tensorboard, resume_step=progress["global_step"]
    )
    exemplars = templates.select_exemplars(task.train, c.first_round_shots, seed=config.seed)
    show_progress = config.logging.progress_bar
    last: dict[str, Any] = {}

    def save(force: bool) -> None:
        items = {**checkpointing.train_state_items("policy", state), "best.params": best_params}
        checkpointer.save(progress["global_step"], items, progress, force=force)

    def log(record: dict[str, Any]) -> dict[str, Any]:
        return writer.write(progress["global_step"], {"round": progress["round"], **record})

    def heldout(params, condition_on: str, rng_index: int, shots=()) -> dict[str, float]:
        """Held-out maj@1, maj@K, pass@K of `params` (the `eval` section), prompts conditioned
        on `condition_on`; with `<|good|>`, also greedy maj@1 conditioned on `<|bad|>`."""
        questions = task.heldout[: config.eval.num_examples or None]
        e = config.eval
        with shd.activation_sharding(mesh, rules):
            figures = rollout.heldout_metrics(
                sampler,
                params,
                questions,
                num_samples=e.num_samples,
                temperature=e.temperature,
                max_new_tokens=e.max_new_tokens,
                rng=jax.random.fold_in(base_rng, rng_index),
                exemplars=shots,
                condition_on=condition_on,
                condition_steps=every_step,
            )
        out = {f"heldout/{k}": v for k, v in figures.items()}
        if condition_on and c.eval_bad_token:
            bad = rounds.greedy_accuracy(sampler, params, questions, e, BAD, every_step)
            out["heldout/bad_token_maj@1"] = bad
        return out

    base_rng = jax.random.PRNGKey(config.seed)
    try:
        with checkpointing.PreemptionGuard() as guard:

            def checkpoint_and_maybe_stop(force: bool = False) -> None:
                stop = guard.should_stop(progress["global_step"])
                save(force or stop)
                # A finished run (last round done) has nothing to resume.
                if stop and progress["round"] < c.num_rounds:
                    raise checkpointing.Preempted(progress["global_step"], workdir)

            if not progress["start_evaluated"]:  # the start model: x = 0 of the study's curves
                # As round 0 samples it: no return token, its few-shot prompt if any.
                record = heldout(best_params, "", 20_000, exemplars)
                progress.update(start_evaluated=True, global_step=progress["global_step"] + 1)
                last = log({**record, "samples_drawn": 0})
                checkpoint_and_maybe_stop(force=True)

            while progress["round"] < c.num_rounds:
                r = progress["round"]
                chunks = rounds.num_chunks(len(task.train), c.sampling_chunk)
                if progress["phase"] == SAMPLE:
                    shots = exemplars if r == 0 else ()
                    prompts = [templates.format_prompt(q["question"], shots) for q in task.train]
                    if r > 0:  # the policy has learnt the return tokens: ask for a good solution
                        prompts = [rcrl.condition_prompt(p, GOOD) for p in prompts]
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
                        desc=f"RCRL round {r}: sampling",
                        show_progress=show_progress,
                        sampling_options=rcrl.step_conditioning(tokenizer, GOOD)
                        if r > 0 and every_step
                        else None,
                    ):
                        columns = chunk.columns
                        labelled = rcrl.label_samples(
                            chunk.question_ids,
                            [stored[i] for i in chunk.question_ids],
                            chunk.texts,
                            chunk.rewards.totals,
                            round=r,
                            step_rewards_fn=None
                            if step_reward_fn is None
                            else (
                                lambda texts, columns=columns: step_reward_fn(texts, columns).dense
                            ),
                        )
                        files.write(files.chunk(r, chunk.index), labelled)
                        progress.update(
                            chunk=chunk.index + 1,
                            global_step=progress["global_step"] + 1,
                            samples_drawn=progress["samples_drawn"] + len(chunk.texts),
                        )
                        log(
                            {
                                **rcrl.label_summary(labelled, **label_thresholds),
                                "sample_accuracy": float(
                                    np.mean(np.asarray(chunk.rewards.totals) >= c.threshold)
                                ),
                                "samples_drawn": progress["samples_drawn"],
                            }
                        )
                        # Every chunk: sampling costs far more than a save, whatever the interval.
                        checkpoint_and_maybe_stop(force=True)
                    dataset, summary = rounds.accumulate_round(
                        files, progress, r, chunks, c.max_per_question
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
                        model,
                        tx,
                        mesh,
                        rules,
                        config.seed + r,
                        params=rounds.copy_tree(source_params),
                    )
                    last = log(
                        {
                            **{f"dataset/{k}": v for k, v in summary.as_dict().items()},
                            **{
                                f"dataset/{k}": v
                                for k, v in rcrl.label_summary(dataset, **label_thresholds).items()
                            },
                        }
                    )
                    checkpoint_and_maybe_stop(force=True)

                # The train phase: every labelled sample, good and bad.
                dataset = files.read(files.dataset(r), progress["dataset"]["digest"])
                arrays, cut = rcrl.rcrl_arrays(
                    tokenizer, dataset, config.train.max_length, c.mode, threshold=threshold
                )
                if cut:
                    _log.warning(
                        "%d of %d RCRL samples are longer than train.max_length.", cut, len(dataset)
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
                        sampler, params, task.validation, c, GOOD, every_step
                    ),
                    mesh=mesh,
                    last_checkpoint=checkpointer.latest_step,
                    name="RCRL",
                )
                for state, best_params, record in steps:  # what save() writes, step by step
                    if record is not None:
                        last = log(record)
                    checkpoint_and_maybe_stop(force=progress["sft_step"] == c.steps_per_round)

                figures = heldout(best_params, GOOD, 10_000 + r)
                progress.update(
                    round=r + 1,
                    phase=SAMPLE,
                    chunk=0,
                    global_step=progress["global_step"] + 1,
                    prompt_conditioning={"policy": GOOD},
                )
                last = log(
                    {
                        **figures,
                        "samples_drawn": progress["samples_drawn"],
                        "selected_step": progress["best"]["step"],
                        "selected_validation_maj@1": progress["best"]["maj@1"],
                        "dataset_size": progress["dataset"]["count"],
                    }
                )
                # The selected model becomes the policy: what sampling and evaluation read.
                state = state.replace(params=rounds.copy_tree(best_params))
                checkpoint_and_maybe_stop(force=True)
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    return last

"""The SFT run: data, model, sharded state, the jitted step, checkpoints and logs.

This is the only stateful layer. Running it twice on the same workdir resumes
from the latest checkpoint (state, RNG and data position) and continues to
the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from rl_reason import checkpointing
from rl_reason.algorithms import optimizer, sft
from rl_reason.algorithms import train_state as ts
from rl_reason.data import sft as sft_data
from rl_reason.data import templates
from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.data.iterator import IndexIterator
from rl_reason.experiments import adapters, runs, sources, tasks
from rl_reason.experiments.config import validate
from rl_reason.models import lora
from rl_reason.models.config import ModelConfig
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import sharding as shd


@dataclasses.dataclass
class SFTData:
    tokenizer: Any
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]


def examples(config: ml_collections.ConfigDict) -> tuple[list, list]:
    """The (train, eval) examples: `tasks.load`'s train split, and its validation
    questions, or the first `data.num_eval` held-out ones when it has none (the
    synthetic task's held-out split has num_eval questions already)."""
    task = tasks.load(config)
    heldout = task.heldout[: config.data.num_eval] if config.data.num_eval else task.heldout
    return task.train, task.validation or heldout


def prepare_data(config: ml_collections.ConfigDict, workdir: str, tokenizer=None) -> SFTData:
    """Tokenized train and eval arrays: prompt -> reference solution, loss on the solution.

    `tokenizer` is the start model's; without one (a synthetic run from scratch)
    a tokenizer is trained on the task's text once and saved with the run.
    """
    train_examples, eval_examples = examples(config)
    if tokenizer is None:
        tokenizer_dir = os.path.join(workdir, "tokenizer")
        if os.path.isdir(tokenizer_dir):
            tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
        else:
            texts = [ex.get("text") or f"{ex['question']}\n{ex['answer']}" for ex in train_examples]
            tokenizer = tokenizer_lib.train_tokenizer(texts, config.data.tokenizer_vocab_size)
            if jax.process_index() == 0:
                tokenizer_lib.save_tokenizer(tokenizer, tokenizer_dir)

    def pack(examples, split):
        prompts, targets = zip(*map(_pair, examples)) if examples else ((), ())
        pairs = sft_data.encode_pairs(tokenizer, prompts, targets)
        arrays, truncated = sft_data.pack_pairs(
            pairs, config.train.max_length, sft_data.pad_id(tokenizer)
        )
        if truncated:
            logging.warning(
                "%d of %d %s examples are longer than train.max_length=%d and were cut.",
                truncated,
                len(pairs),
                split,
                config.train.max_length,
            )
        return arrays

    return SFTData(tokenizer, pack(train_examples, "train"), pack(eval_examples, "eval"))


def _pair(example) -> tuple[str, str]:
    """(prompt, target) of one example: a task question's zero-shot prompt and its
    reference solution, or a pretraining document (`text`) that is all target."""
    if "text" in example:
        return "", example["text"]
    return (
        templates.format_prompt(example["question"]),
        templates.format_completion(example["answer"]),
    )


def start_model(config: ml_collections.ConfigDict, mesh, rules) -> sources.LoadedModel | None:
    """The model SFT starts from (`model_source`, with `train.remat` applied), or None for a
    model trained from scratch (a config without a model_source section)."""
    if "model_source" not in config:
        return None
    kind, path = config.model_source.kind, config.model_source.path
    start = sources.load_model(kind, path, mesh, rules)
    if start.tokenizer is None:
        raise sources.ModelSourceError(
            kind, path, "it has no tokenizer files; SFT encodes the data with the model's own."
        )
    if config.train.get("remat"):  # recomputation changes no parameter, only what a step keeps
        start = start._replace(config=start.config.replace(remat=config.train.remat))
    return start


def model_config(config: ml_collections.ConfigDict, tokenizer) -> ModelConfig:
    """The model section, with vocab_size taken from the tokenizer when it is 0."""
    values = dict(config.model)
    if values["vocab_size"] <= 0:
        values["vocab_size"] = len(tokenizer)
    return ModelConfig.from_dict(values)


def _eval_fn(model: Transformer, chunk_size: int):
    def evaluate(params, batch):
        _, aux = sft.sft_loss(params, batch, model, jnp.float32(1.0), chunk_size)
        return aux["nll_sum"], aux["hits"], sft.target_weights(batch).sum()

    return jax.jit(evaluate)


def evaluate(eval_fn, params, arrays: dict[str, np.ndarray], batch_size: int, mesh) -> dict:
    """Token-mean loss and accuracy over every eval row (the last batch padded with empty rows)."""
    n = len(arrays["tokens"])
    totals = np.zeros(3)
    for start in range(0, n, batch_size):
        rows = {k: v[start : start + batch_size] for k, v in arrays.items()}
        pad = batch_size - len(rows["tokens"])
        rows = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in rows.items()}
        totals += shd.to_host(eval_fn(params, shd.shard_batch(rows, mesh)))
    nll, hits, count = totals
    return {"eval_loss": nll / max(count, 1), "eval_token_accuracy": hits / max(count, 1)}


def jit_sft_step(config: ml_collections.ConfigDict, model: Transformer, tx, schedule, mesh, rules):
    """`sft_step` as the `train` section sets it, compiled on the mesh (SFT and EI rounds)."""
    step = sft.make_sft_step(
        model,
        tx,
        num_microbatches=config.train.num_microbatches,
        chunk_size=config.train.loss_chunk_size,
        lr_schedule=schedule,
    )
    return ts.jit_step(step, mesh, rules, ts.state_shardings(model, tx, mesh, rules))


def _restored_or_new_state(run, model, tx, start, lora_settings, expected, iterator):
    """The run's latest state (its start checked, `iterator` moved to its position), or
    a new one from the start model: fresh (or lora.init's) adapters under LoRA."""
    config, mesh, rules = run.config, run.mesh, run.rules
    restored = run.restore(
        _state_items(ts.abstract_train_state(model, tx, mesh, rules), lora_settings)
    )
    if restored is not None:
        items, progress = restored
        _check_same_start(config, run.workdir, progress, expected)
        iterator.restore(progress["data"])
        if lora_settings is None:
            return checkpointing.merge_train_state("policy", items)
        return adapters.merge_state_items(items, start.params)
    params = start.params if start else None
    if lora_settings is not None:
        params = adapters.initial_params(config, model, params, jax.random.PRNGKey(config.seed))
    # The state takes the start's buffers: nothing else reads them (no second copy).
    return ts.create_train_state(
        model, tx, mesh, rules, config.seed, params=params, donate=params is not None
    )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) SFT to config.train.num_steps; returns the last logged metrics.

    Raises checkpointing.Preempted after saving when SIGTERM/SIGINT arrives.
    """
    with runs.Run(config, workdir, validate) as run:
        mesh, rules = run.mesh, run.rules
        start = start_model(config, mesh, rules)
        data = prepare_data(config, workdir, start.tokenizer if start else None)
        model = Transformer(start.config if start else model_config(config, data.tokenizer))
        tx, schedule = optimizer.make_optimizer(config.optim, config.train.num_steps)
        # The start model's fingerprint: a resume from another start is an error, not a mix.
        expected = sources.fingerprints(start.params) if start else (None,)
        initial = {"initial": expected[0]} if start else {}
        # LoRA: adapters on the frozen start (validate: only with a start model).
        lora_settings = adapters.lora_config(config)
        if lora_settings is not None:
            model, tx = lora.LoraModel(model, lora_settings), lora.lora_optimizer(tx)
            initial["lora"] = adapters.record(config, lora_settings, expected[0])
        iterator = IndexIterator(
            len(data.train["tokens"]),
            config.train.batch_size,
            seed=config.seed,
            shuffle=config.data.shuffle,
        )
        state = _restored_or_new_state(run, model, tx, start, lora_settings, expected, iterator)
        del start  # its parameters are the state's now, or were only needed for the checksum
        first = int(state.step)
        if first >= config.train.num_steps:
            return run.finished(f"finished at step {first}")
        run.begin(data.tokenizer, first)

        step_fn = jit_sft_step(config, model, tx, schedule, mesh, rules)
        eval_fn = _eval_fn(model, config.train.loss_chunk_size)
        eval_batch = config.train.batch_size // config.train.num_microbatches
        end = config.train.num_steps
        if config.train.stop_after:
            end = min(end, first + config.train.stop_after)
        last: dict[str, Any] = {}
        own_rows = shd.process_rows(mesh, config.train.batch_size)
        recorded = {"models": {"policy": model.config.to_dict()}, **initial}
        for step in tqdm.trange(
            first,
            end,
            initial=first,
            total=config.train.num_steps,
            desc="sft",
            disable=not run.show_progress,
        ):
            rows = next(iterator)[own_rows]  # this process reads only its rows
            batch = {k: v[rows] for k, v in data.train.items()}
            batch = shd.shard_process_rows(batch, mesh, config.train.batch_size)
            state, metrics = step_fn(state, batch)
            done = step + 1
            metrics = jax.device_get(metrics)  # one sync a step: the finite gate
            if metrics["finite"] != 1.0:
                run.log(done, metrics)  # the failing step's record, for the post-mortem
            run.check_finite(metrics, f"SFT step {done}")
            if done % config.train.log_every == 0 or done == config.train.num_steps:
                if done % config.train.eval_every == 0 or done == config.train.num_steps:
                    metrics.update(evaluate(eval_fn, state.params, data.eval, eval_batch, mesh))
                last = run.log(done, metrics)
            items = _state_items(state, lora_settings)
            progress = {"data": iterator.state(), **recorded}
            run.checkpoint(done, items, progress, force=done == end, finished=done == end)
        return last


def _state_items(state, lora_settings) -> dict[str, Any]:
    """The checkpoint items: the whole state, or under LoRA its adapters and heads."""
    if lora_settings is None:
        return checkpointing.train_state_items("policy", state)
    return adapters.state_items(state)


def _check_same_start(config, workdir: str, progress, expected) -> None:
    """A resume from another start model than the run's is an error, not a mix."""
    if progress.get("initial") not in expected:
        source = config.get("model_source")
        raise runs.ResumeConfigError(
            f"The run in {workdir} started from another model than the config's"
            f" ({f'{source.kind}: {source.path!r}' if source else 'trained from scratch'};"
            f" checksum {expected[0]}, recorded {progress.get('initial')})."
        )

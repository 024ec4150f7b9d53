"""Evaluation runs: greedy maj@1 plus K samples for maj@K, pass@K and diversity.

One set of K samples per question serves every metric (see
rl_reason/evaluation/evaluate.py). The run writes `eval_metrics.json`,
`eval_samples.jsonl` (every question's completions and judgements) and a
`report.md` with the figures, wall time and tokens/s.

Questions are sampled in chunks of `sampling.chunk`, each saved atomically
under `eval_progress/` as it finishes: a killed evaluation (hours for a real
model on CPU) rerun with the same config and workdir resumes after its last
saved chunk and ends with the results an uninterrupted run gives. A chunk is
reused only for the same settings, model weights and prompts. With several
processes the workdir must be shared, as for checkpoints. `seconds` sums the
chunks' sampling time, compilation included (once per session).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from rl_reason import checkpointing
from rl_reason.algorithms import rcrl
from rl_reason.data import builders, synthetic, templates
from rl_reason.evaluation.evaluate import evaluate as score
from rl_reason.experiments import rollout, runs, sources
from rl_reason.parallel import sharding as shd
from rl_reason.sampling.engine import common_prefix_length

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalSet:
    questions: list[dict[str, str]]
    exemplars: list[dict[str, str]]


def load_eval_set(config: ml_collections.ConfigDict) -> EvalSet:
    """The questions to score (the first num_examples, in the data set's order) and few-shot exemplars."""
    task, n = config.eval.task, config.eval.num_examples
    if task == "synthetic":
        difficulty = synthetic.Difficulty(
            config.data.min_steps, config.data.max_steps, config.data.max_operand
        )
        rows = synthetic.generate(
            "test", n or config.data.num_eval, seed=config.seed, difficulty=difficulty
        )
        train = synthetic.generate(
            "train", max(config.eval.num_shots, 1), seed=config.seed, difficulty=difficulty
        )
    else:
        read = lambda dataset, split: [
            builders.decode(row)
            for row in builders.data_source(
                dataset,
                split,
                data_dir=config.data.tfds_dir,
                manual_dir=config.data.manual_dir or None,
            )
        ]
        rows = read("gsm8k", "test") if task == "gsm8k" else read("svamp", "test")
        rows = rows[:n] if n else rows
        train = read("gsm8k", "train")  # SVAMP has no train split: GSM8K exemplars
    exemplars = templates.select_exemplars(train, config.eval.num_shots, seed=config.seed)
    return EvalSet(rows, exemplars)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    # No checkpoints: the chunks saved under eval_progress/ are what a rerun resumes.
    mesh, rules = runs.start(config, workdir, validate=lambda config: None, resumes=False)
    model_config, params, tokenizer = sources.load_model(
        config.model_source.kind, config.model_source.path, mesh, rules
    )
    data = load_eval_set(config)
    prompts = [templates.format_prompt(q["question"], data.exemplars) for q in data.questions]
    conditioned = conditioning(config, tokenizer)
    condition_on, condition_steps = conditioned
    if condition_on:
        prompts = [rcrl.condition_prompt(p, condition_on) for p in prompts]
    golds = [q["final_answer"] for q in data.questions]
    sampler = rollout.run_sampler(
        config,
        model_config,
        tokenizer,
        mesh if jax.device_count() > 1 else None,
        rules,
        progress=config.logging.progress_bar and jax.process_index() == 0,
        compiler_options=config.eval.compiler_options.to_dict(),
    )
    e = config.eval
    options = rcrl.step_conditioning(tokenizer, condition_on) if condition_steps else None
    progress = _Progress(
        os.path.join(workdir, "eval_progress"), _fingerprint(config, model_config, params)
    )
    # SIGTERM or SIGINT stops after the chunk being sampled is saved (exit 75, as a
    # training run): a rerun resumes after it.
    with checkpointing.PreemptionGuard() as guard:
        chunks = _sample(sampler, params, prompts, config, progress, options, guard, workdir)
    if progress.resumed:
        _log.info(
            "Reused %d of %d questions from %s.", progress.resumed, len(prompts), progress.directory
        )
    greedy = [text for c in chunks for text in c["greedy"]]
    k_texts = [texts for c in chunks for texts in c["samples"]]
    orm_scores = None
    if e.orm_source:  # rerank@k: the ORM's final-token score of every sample
        orm_scores = _orm_scores(config, mesh, prompts, k_texts)
    ks = tuple(e.get("ks", ())) or None
    metrics = score(k_texts, golds, greedy=greedy, scores=orm_scores, ks=ks)
    generated = sum(c["generated_tokens"] for c in chunks)
    seconds = sum(c["seconds"] for c in chunks)  # sampling time, over every session of the run
    metrics.update(
        num_questions=len(prompts),
        seconds=seconds,
        generated_tokens=generated,
        tokens_per_second=generated / max(seconds, 1e-9),
    )
    if jax.process_index() == 0:
        _write_outputs(workdir, config, data, greedy, k_texts, metrics, orm_scores, conditioned)
    return metrics


def _sample(
    sampler, params, prompts, config, progress, options, guard, workdir
) -> list[dict[str, Any]]:
    """Every question's greedy answer and K samples, chunk by chunk: a chunk this
    evaluation saved before is read back, a new one sampled and saved (and the
    evaluation stops there if `guard` says so)."""
    e, rng = config.eval, jax.random.PRNGKey(config.seed)
    # Whole batches per chunk, and one shared prefix for all, so that chunking
    # changes neither a batch nor a prompt's computation.
    batch = config.sampling.batch_size
    chunk_size = -(-(config.sampling.chunk or len(prompts)) // batch) * batch
    shared = common_prefix_length(sampler.token_ids(prompts))
    chunks = []
    for index, first in enumerate(range(0, len(prompts), chunk_size)):
        part = prompts[first : first + chunk_size]
        chunk = progress.load(first, part)
        if chunk is None:
            start = time.perf_counter()
            greedy, samples, out = rollout.greedy_first(
                sampler,
                params,
                part,
                rng,
                num_samples=e.num_samples,
                temperature=e.temperature,
                top_p=e.top_p,
                max_new_tokens=e.max_new_tokens,
                sampling_options=options,
                prompt_offset=first,
                prefix_length=shared,
            )
            chunk = {
                "greedy": greedy,
                "samples": samples,
                "generated_tokens": int(out.rollout.lengths.sum()),
                "seconds": time.perf_counter() - start,
            }
            if jax.process_index() == 0:
                progress.save(first, part, chunk)
        chunks.append(chunk)
        done = first + len(part) >= len(prompts)
        if guard.should_stop(index) and not done:
            raise checkpointing.Preempted(index + 1, workdir)
    return chunks


def _orm_scores(config, mesh, prompts, k_texts) -> list[list[float]]:
    """Each sample's score by the ORM run at eval.orm_source, grouped like k_texts.

    Scoring follows sampling (the samples are the chunks' saved ones), so an
    evaluation can be reranked by another ORM without sampling again.
    """
    scorer = sources.orm_scorer(
        config.eval.orm_source,
        mesh,
        shd.rules_from_config(config.mesh.rules),
        batch_size=config.sampling.batch_size,
        length_buckets=tuple(config.eval.orm_length_buckets),
    )
    texts = [text for group in k_texts for text in group]
    rows = [p for p, group in zip(prompts, k_texts) for _ in group]
    flat = [row[0] for row in scorer(texts, {"prompt": rows}, [[len(t)] for t in texts])]
    out, start = [], 0
    for group in k_texts:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return out


def conditioning(config: ml_collections.ConfigDict, tokenizer) -> tuple[str, bool]:
    """The return token the prompts carry ("" for none), and whether it starts every
    step of the solution too.

    `eval.condition_on`: "auto" is what the model's run records
    (`sources.prompt_conditioning`), "none" none, else that token.
    `eval.condition_steps`: "auto" what the run records (a dense RCRL run:
    yes), "every" or "first" (the solution's start only).
    """
    value, steps = config.eval.condition_on, config.eval.condition_steps
    recorded = ("", False)
    if "auto" in (value, steps) and config.model_source.kind == "run":
        recorded = sources.prompt_conditioning(config.model_source.path)
    if value == "auto":
        value = recorded[0]
    elif value == "none":
        value = ""
    if value and value not in tokenizer.get_vocab():
        raise ValueError(
            f"eval.condition_on={config.eval.condition_on!r}: the model's tokenizer has no"
            f" {value!r} (return tokens exist in Return-Conditioned RL runs only)."
        )
    if steps not in ("auto", "every", "first"):
        raise ValueError(f"eval.condition_steps={steps!r}: one of 'auto', 'every', 'first'.")
    every_step = recorded[1] if steps == "auto" else steps == "every"
    return value, bool(value) and every_step


def _fingerprint(config: ml_collections.ConfigDict, model_config, params) -> dict[str, Any]:
    """What an evaluation's results depend on besides its prompts (checked per chunk).

    The weights enter as a checksum, so that a checkpoint trained further or a
    file replaced under the same path is not mixed with earlier results.
    """
    checksum = jax.jit(
        lambda p: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(p))
    )(params)
    return json.loads(
        json.dumps(
            {
                "seed": config.seed,
                # The ORM scores samples after they are drawn: not a sampling setting.
                # The sampling section under the eval keys it had before it moved
                # (config.MOVED_KEYS), so that evaluations begun then still resume.
                "eval": {
                    **{k: v for k, v in config.eval.to_dict().items() if not k.startswith("orm_")},
                    "batch_size": config.sampling.batch_size,
                    "prompt_buckets": config.sampling.prompt_buckets,
                    "chunk_size": config.sampling.chunk,
                    # The sampler's precision when it has its own (absent: the model's).
                    **({"dtype": config.sampling.dtype} if config.sampling.get("dtype") else {}),
                },
                "model": _model_fingerprint(model_config),
                "weights_abs_sum": f"{float(checksum):.6e}",
            },
            default=list,
        )
    )


# Model settings added after evaluations began to be fingerprinted: at their defaults
# they change nothing an evaluation computes, and leaving them out keeps the chunks of
# an evaluation begun before them resumable.
_ADDED_MODEL_SETTINGS = ("attention", "attention_block_q", "attention_block_k", "lm_head_fp32")


def _model_fingerprint(model_config) -> dict[str, Any]:
    record, defaults = dataclasses.asdict(model_config), dataclasses.asdict(type(model_config)())
    for key in _ADDED_MODEL_SETTINGS:
        if key in record and record[key] == defaults.get(key):
            del record[key]
    return record


class _Progress:
    """Finished chunks of an evaluation, one JSON file each, written atomically."""

    def __init__(self, directory: str, fingerprint: dict[str, Any]):
        self.directory = directory
        self.fingerprint = fingerprint
        self.resumed = 0  # questions of the chunks reused

    def _path(self, first: int) -> str:
        return os.path.join(self.directory, f"chunk_{first:07d}.json")

    def _key(self, prompts: list[str]) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
        return {**self.fingerprint, "prompts_sha256": digest}

    def load(self, first: int, prompts: list[str]) -> dict[str, Any] | None:
        """The chunk of `prompts` starting at question `first`, if this evaluation saved it."""
        path = self._path(first)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") != self._key(prompts):
            raise ValueError(
                f"{path} was written by an evaluation with a different config, model or"
                f" questions; rerun with those, or use a new workdir (or delete"
                f" {self.directory})."
            )
        self.resumed += len(prompts)
        return saved["chunk"]

    def save(self, first: int, prompts: list[str], chunk: dict[str, Any]) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = self._path(first)
        with open(path + ".tmp", "w") as f:
            json.dump({"key": self._key(prompts), "chunk": chunk}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)


def _write_outputs(workdir, config, data, greedy, k_texts, metrics, orm_scores, conditioned):
    """eval_metrics.json, eval_samples.jsonl and report.md; `conditioned` is what
    `conditioning` returned."""
    golds = [q["final_answer"] for q in data.questions]
    condition_on, condition_steps = conditioned
    with open(os.path.join(workdir, "eval_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(workdir, "eval_samples.jsonl"), "w") as f:
        for i, (q, g, texts, gold) in enumerate(zip(data.questions, greedy, k_texts, golds)):
            row = {"question": q["question"], "gold": gold, "greedy": g, "samples": texts}
            if orm_scores is not None:
                row["orm_scores"] = orm_scores[i]
            f.write(json.dumps(row) + "\n")
    lines = [
        f"# Evaluation: {config.eval.task} ({len(golds)} questions)",
        "",
        f"model: `{config.model_source.kind}` {config.model_source.path}; "
        f"{config.eval.num_shots}-shot; K={config.eval.num_samples} at temperature "
        f"{config.eval.temperature}; up to {config.eval.max_new_tokens} new tokens"
        + (f"; rerank by the ORM of {config.eval.orm_source}" if orm_scores is not None else "")
        + (f"; prompts conditioned on `{condition_on}`" if condition_on else "")
        + (" (and every step)" if condition_steps else ""),
        "",
        "| metric | value |",
        "|---|---|",
        *[
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in metrics.items()
        ],
    ]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

"""The rollout stage every RL algorithm shares: prompts -> samples -> rewards.

PPO and GRPO turn the result into advantages (`collect`: one batch of
training arrays), Expert Iteration keeps the correct samples, RCRL labels
them with return tokens, the ORM learns from them (`sample_chunks`: a
question set in resumable chunks, each chunk's records saved in the run's
`RecordStore` before the next is drawn). The sampler reads the learner's
parameters as they are, on the same mesh (no copy into another engine).
Held-out evaluation during training (greedy maj@1, maj@K, pass@K) lives here
too, so that every algorithm reports the study's metrics against samples
drawn.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from rl_reason import checkpointing
from rl_reason.algorithms import ppo, rcrl
from rl_reason.algorithms import rollout_correction as rc
from rl_reason.algorithms.logprobs import token_logprobs
from rl_reason.data import records, templates
from rl_reason.evaluation.evaluate import evaluate as score_samples
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose
from rl_reason.rewards.token_positions import sampled_token_rewards
from rl_reason.sampling.continuous import EngineConfig
from rl_reason.sampling.engine import Sampler, Samples, common_prefix_length
from rl_reason.sampling.sampler import LENGTH, Rollout, SamplingConfig


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

    def take_groups(self, groups: Sequence[int]) -> RolloutBatch:
        """The K rows of each of `groups` (prompt indices), in that order."""
        k = self.num_samples
        rows = np.asarray([g * k + i for g in groups for i in range(k)], np.int64)
        pick = lambda values: [values[r] for r in rows]
        rewards = compose.Rewards(
            totals=pick(self.rewards.totals),
            dense=pick(self.rewards.dense),
            components={name: pick(v) for name, v in self.rewards.components.items()},
        )
        samples = Samples(
            rollout=jax.tree.map(lambda x: np.asarray(x)[rows], self.samples.rollout),
            texts=pick(self.texts),
            num_samples=k,
        )
        sequences = {key: value[rows] for key, value in self.sequences.items()}
        return RolloutBatch(
            samples, pick(self.examples), rewards, sequences, self.token_scores[rows]
        )


def token_span(input_mask: np.ndarray, multiple: int) -> slice:
    """The columns of a rollout's [N, L] arrays that the learner needs: from the first
    column any row has a token in to the last, widened to a multiple of `multiple`
    (one program per width: a few widths, not one a batch) and at most L.

    Prompts are left-padded to the sampler's bucket and completions right-padded to
    the budget, so a batch whose longest prompt is shorter than its bucket, or whose
    rows all stopped early, carries columns of padding only; scoring and the update
    cost what they hold. Cutting them changes no token's position (positions count
    the input mask) nor what any token attends to. `multiple` <= 0: every column.
    """
    width = input_mask.shape[1]
    used = np.flatnonzero(np.asarray(input_mask).any(axis=0))
    if multiple <= 0 or used.size == 0:
        return slice(0, width)
    first, end = int(used[0]), int(used[-1]) + 1
    span = min(-(-(end - first) // multiple) * multiple, width)
    start = max(end - span, 0)  # widened to the left (prompt padding) first
    return slice(start, start + span)


def concatenate(batches: Sequence[RolloutBatch]) -> RolloutBatch:
    """One batch of several rollouts' rows, in order (DAPO's refills). Prompt-side arrays
    are left-padded and completion-side arrays right-padded to the widest batch's."""
    if len(batches) == 1:
        return batches[0]
    prompt_width = max(b.samples.rollout.prompt_tokens.shape[1] for b in batches)
    completion_width = max(b.samples.rollout.completion_tokens.shape[1] for b in batches)

    def widen(x, before: int, after: int):
        x = np.asarray(x)
        return np.pad(x, [(0, 0), (before, after)]) if x.ndim == 2 else x

    def widened(batch: RolloutBatch) -> tuple[Rollout, dict, np.ndarray]:
        rollout = batch.samples.rollout
        before = prompt_width - rollout.prompt_tokens.shape[1]
        after = completion_width - rollout.completion_tokens.shape[1]
        prompt_side = {"prompt_tokens", "prompt_mask"}
        fields = {
            f.name: widen(
                getattr(rollout, f.name), *((before, 0) if f.name in prompt_side else (0, after))
            )
            for f in dataclasses.fields(rollout)
        }
        sequences = {key: widen(value, before, after) for key, value in batch.sequences.items()}
        return rollout.replace(**fields), sequences, widen(batch.token_scores, before, after)

    parts = [widened(b) for b in batches]
    join = lambda values: np.concatenate(values, axis=0)
    rewards = [b.rewards for b in batches]
    return RolloutBatch(
        samples=Samples(
            rollout=jax.tree.map(lambda *xs: join(xs), *[p[0] for p in parts]),
            texts=[t for b in batches for t in b.texts],
            num_samples=batches[0].num_samples,
        ),
        examples=[ex for b in batches for ex in b.examples],
        rewards=compose.Rewards(
            totals=[t for r in rewards for t in r.totals],
            dense=[d for r in rewards for d in r.dense],
            components={
                name: [v for r in rewards for v in r.components[name]]
                for name in rewards[0].components
            },
        ),
        sequences={key: join([p[1][key] for p in parts]) for key in parts[0][1]},
        token_scores=join([p[2] for p in parts]),
    )


def run_sampler(config, model_config, tokenizer, mesh, rules, **options) -> Sampler:
    """The sampler of a run, from its `sampling` section: batch, prompt buckets, its own
    precision (`dtype`) and whether over-long prompts are cut (`truncate_prompts`,
    on by default in run configs: runs began with it); the task template's stop
    strings. `options`: further Sampler arguments (stop_strings, progress, ...)."""
    s = config.sampling
    settings = dict(
        batch_size=s.batch_size,
        prompt_buckets=tuple(s.prompt_buckets),
        mesh=mesh,
        rules=rules,
        stop_strings=templates.STOP_SEQUENCES,
        dtype=s.get("dtype") or None,
        truncate_prompts=s.get("truncate_prompts", True),
        engine=engine_config(s),
        min_rows=s.get("min_rows", SamplingConfig.min_rows),
    )
    return Sampler(model_config, tokenizer, **{**settings, **options})


def engine_config(s) -> EngineConfig | None:
    """The continuous engine's shape from a `sampling` section (None: static batches)."""
    engine = s.get("engine", "static")
    if engine not in ("static", "continuous"):
        raise ValueError(f"sampling.engine={engine!r}: 'static' or 'continuous'.")
    if engine == "static":
        return None
    return EngineConfig(slots=s.slots, page_size=s.page_size, kv_cache_bytes=s.kv_cache_bytes)


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
    columns = {**columns_k(examples, k), "prompt": [p for p in prompts for _ in range(k)]}
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
    on_samples: Callable[[Samples], None] | None = None,
) -> list[str]:
    """num_samples completions per prompt, prompt-major, drawn samples_per_call at a time
    (0: all in one call; the study's K=96 rows per prompt need not share one KV cache).
    ``sampling_options``: further SamplingConfig fields (dense RCRL's step conditioning);
    ``on_samples``: called with each call's Samples (the mismatch's measure reads them).

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
        if on_samples is not None:
            on_samples(out)
        for group, texts in zip(groups, out.texts_per_prompt()):
            group.extend(texts)
    return [text for group in groups for text in group]


def columns_k(examples: Sequence[Mapping[str, Any]], k: int) -> dict[str, list[Any]]:
    """Every column of `examples`, each row repeated k times (prompt-major): what
    rewards see beside k samples per example."""
    if not examples:
        return {}
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
    options = None
    if condition_on:
        prompts = [rcrl.condition_prompt(p, condition_on) for p in prompts]
        if condition_steps:
            options = rcrl.step_conditioning(sampler.tokenizer, condition_on)
    greedy, k_texts, _ = greedy_first(
        sampler,
        params,
        prompts,
        rng,
        num_samples=num_samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        sampling_options=options,
    )
    return score_samples(k_texts, [q["final_answer"] for q in questions], greedy=greedy)


def greedy_first(
    sampler: Sampler,
    params: Any,
    prompts: Sequence[str],
    rng: jax.Array,
    *,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    top_p: float = 1.0,
    sampling_options: Mapping[str, Any] | None = None,
    prompt_offset: int | None = None,
    prefix_length: int | None = None,
) -> tuple[list[str], list[list[str]], Samples]:
    """Each prompt's greedy completion and its K samples (the greedy one when K = 0), in
    one sampler call: the greedy row continues the K samples' prefill. What every
    evaluation reads (maj@1 from the greedy answers; maj@K, pass@K from the samples)."""
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, temperature=0.0)
    if num_samples > 0:
        options.update(
            temperature=temperature, top_p=top_p, num_samples=num_samples + 1, greedy_first=True
        )
    options.update(sampling_options or {})
    # Where the prompts stand in a larger set (chunked evaluation), when they do.
    placement = {"prompt_offset": prompt_offset, "prefix_length": prefix_length}
    placement = {k: v for k, v in placement.items() if v is not None}
    out = sampler.generate(params, prompts, rng, sampler.sampling_config(**options), **placement)
    groups = out.texts_per_prompt()
    greedy = [g[0] for g in groups]
    return greedy, [g[1:] if num_samples > 0 else [g[0]] for g in groups], out


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


def greedy_accuracy(
    sampler: Sampler,
    params: Any,
    questions: Sequence[Mapping[str, Any]],
    max_new_tokens: int,
    condition_on: str = "",
    condition_steps: bool = False,
) -> float:
    """Greedy maj@1 on `questions` (validation: what picks a round's model), prompts
    (and with `condition_steps` every step) conditioned on `condition_on`."""
    with shd.activation_sharding(sampler.mesh, sampler.rules):
        metrics = heldout_metrics(
            sampler,
            params,
            questions,
            num_samples=0,
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            rng=jax.random.PRNGKey(0),
            condition_on=condition_on,
            condition_steps=condition_steps,
        )
    return metrics["maj@1"]


class RecordStore:
    """A run's scored samples under `<workdir>/<directory>/`: each chunk's records
    (`<group>/chunk_<c>.jsonl`, a group being a round or a split) and assembled
    datasets (`<name>.jsonl`), as `records.to_jsonl` writes records of `record_type`.

    Writes are atomic, by the lead process, and no process returns before the
    file is there (the others may read it next); a damaged file, or one whose
    digest is not the one the checkpoint recorded, is a CorruptCheckpointError
    naming it.
    """

    def __init__(self, workdir: str, directory: str, record_type: type = records.Solution):
        self.root = os.path.join(workdir, directory)
        self.record_type = record_type

    def chunk(self, group: str, index: int) -> str:
        return os.path.join(self.root, group, f"chunk_{index:05d}.jsonl")

    def dataset(self, name: str) -> str:
        return os.path.join(self.root, f"{name}.jsonl")

    def write(self, path: str, items: Sequence[Any]) -> None:
        write_records(path, items, self.record_type)

    def read(self, path: str, digest: str | None = None) -> tuple[Any, ...]:
        return read_records(path, digest, self.record_type)

    def read_chunks(self, group: str, count: int) -> list[Any]:
        """Every record of `group`'s first `count` chunks, in chunk order."""
        return [s for i in range(count) for s in self.read(self.chunk(group, i))]


def write_records(path: str, items: Sequence[Any], record_type: type = records.Solution) -> None:
    """`items` (records of `record_type`) as checksummed JSON lines, atomically (see
    `RecordStore`)."""
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        checkpointing.write_bytes_atomic(path, records.to_jsonl(items, record_type))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"wrote {path}")


def read_records(
    path: str, digest: str | None = None, record_type: type = records.Solution
) -> records.Dataset:
    """What `write_records` wrote, checked against `digest` when given."""
    with open(path, "rb") as f:
        try:
            dataset = records.from_jsonl(f.read(), record_type)
        except ValueError as e:
            raise checkpointing.CorruptCheckpointError(f"{path}: {e}") from None
    if digest is not None and records.dataset_digest(dataset) != digest:
        raise checkpointing.CorruptCheckpointError(
            f"{path} is not the dataset the checkpoint recorded (digest differs)."
        )
    return dataset


def num_chunks(num_questions: int, chunk_size: int) -> int:
    return len(range(0, num_questions, chunk_size))


@dataclasses.dataclass(frozen=True)
class ChunkSampling:
    """How a question set is sampled: K per question, chunk by chunk."""

    num_samples: int
    temperature: float
    max_new_tokens: int
    chunk_size: int  # questions per chunk (a kill loses one chunk at most)
    samples_per_call: int = 0  # draw K in calls of this many (0: all K in one call)


@dataclasses.dataclass
class SampledChunk:
    """K samples for each question of one chunk, scored; rows are prompt-major."""

    index: int  # the chunk's number in its set
    first: int  # its first question's index in the set
    prompts: list[str]  # per question of the chunk: the prompt sampled
    question_ids: list[int]  # per row: the question's index in the set
    texts: list[str]
    columns: dict[str, list[Any]]  # per row: every column of its question's example
    rewards: compose.Rewards
    mismatch: dict[str, float] = dataclasses.field(default_factory=dict)  # `measure`'s


def sample_chunks(
    sampler: Sampler,
    params: Any,
    questions: Sequence[Mapping[str, Any]],
    prompts: Sequence[str],
    rng: jax.Array,
    how: ChunkSampling,
    reward_fn: compose.Composite,
    *,
    start: int = 0,
    desc: str = "sampling",
    show_progress: bool = False,
    sampling_options: Mapping[str, Any] | None = None,
    measure: Callable[[Samples], dict[str, float]] | None = None,
) -> Iterator[SampledChunk]:
    """The set's chunks from chunk `start` on, each sampled with `params` (further
    SamplingConfig fields in `sampling_options`) and scored by `reward_fn` on every
    column of its examples; `measure` (a `MismatchMeter`) gives each chunk's
    sampler/learner mismatch.

    A prompt's draws depend on its index in `prompts` (not on the chunking or
    on where a resumed run starts), and every chunk prefills the prefix all
    prompts share. A generator: the caller saves each chunk before the next.
    """
    shared = common_prefix_length(sampler.token_ids(prompts))
    size, k = how.chunk_size, how.num_samples
    for index in tqdm.tqdm(
        range(start, num_chunks(len(prompts), size)), desc=desc, disable=not show_progress
    ):
        first = index * size
        part, chunk_prompts = questions[first : first + size], list(prompts[first : first + size])
        calls: list[Samples] = []
        texts = sample_k(
            sampler,
            params,
            chunk_prompts,
            rng,
            num_samples=k,
            temperature=how.temperature,
            max_new_tokens=how.max_new_tokens,
            samples_per_call=how.samples_per_call,
            prompt_offset=first,
            prefix_length=shared,
            sampling_options=sampling_options,
            on_samples=calls.append if measure else None,
        )
        columns = columns_k(part, k)
        qids = [first + i for i in range(len(part)) for _ in range(k)]
        rewards = reward_fn(texts, columns)
        mismatch = combine_mismatch([measure(c) for c in calls]) if measure else {}
        yield SampledChunk(index, first, chunk_prompts, qids, texts, columns, rewards, mismatch)


class MismatchMeter:
    """The sampler/learner mismatch of sampled rows: the learner's log-probs of the
    tokens (one forward of `model`, as the fine-tuning step computes them) against the
    sampler's (`rollout_correction.mismatch_metrics`, under "mismatch/"). What EI and
    RCRL log per chunk when either side computes in less than float32; they fine-tune
    on kept samples, so there is nothing to correct. `meter(params, samples)`."""

    def __init__(self, model, chunk_size: int = 256):
        def metrics(params, sequences, sampler_logprobs):
            valid = ppo.valid_tokens(sequences)
            learner = token_logprobs(
                model,
                params,
                sequences["tokens"],
                sequences["input_mask"],
                chunk_size=chunk_size,
                needed=valid,
            )
            return rc.mismatch_metrics(learner.logprobs, sampler_logprobs, valid)

        self._metrics = jax.jit(metrics)

    def __call__(self, params: Any, samples: Samples) -> dict[str, float]:
        rollout = samples.rollout
        out = self._metrics(params, rollout.sequences(), rollout.sequence_logprobs())
        return {f"mismatch/{k}": float(v) for k, v in jax.device_get(out).items()}


def combine_mismatch(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One chunk's mismatch from its calls': maxima of *_max, minima of *_min, the sum of
    the token counts, means of the rest (the calls are alike in size)."""
    if not parts:
        return {}

    def combine(key: str, values: list[float]) -> float:
        if key.endswith("_max"):
            return max(values)
        if key.endswith("_min"):
            return min(values)
        return sum(values) if key.endswith("tokens") else float(np.mean(values))

    return {k: float(combine(k, [p[k] for p in parts])) for k in parts[0]}

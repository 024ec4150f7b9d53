"""Return-Conditioned RL (RCRL): fine-tune on samples prefixed with their return.

As in the study (after Decision Transformer / Quark-style conditioning): each
sampled solution is labelled with a return token -- ``<|good|>`` if it earned
the reward, ``<|bad|>`` otherwise -- placed where the solution starts, and the
model is fine-tuned with the ordinary SFT step on correct *and* incorrect
samples. At test time the prompt carries ``<|good|>``, asking for a solution
like the good ones. Sparse RCRL puts one token before the whole solution;
dense RCRL puts one before every step (a non-blank line), labelled from that
step's reward (step-match credit, or the ORM's score at the step's end).

The return tokens are conditioning, not targets: the loss never trains the
model to predict them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import chex
import jax.numpy as jnp
import numpy as np

from rl_reason.algorithms import expert_iteration as ei
from rl_reason.data import sft as sft_data
from rl_reason.data import templates
from rl_reason.models.config import ModelConfig
from rl_reason.rewards.steps import split_steps

GOOD = "<|good|>"
BAD = "<|bad|>"
RETURN_TOKENS = (GOOD, BAD)
RETURN_WORDS = (" good", " bad")  # what the tokens start as under LoRA (`add_return_tokens`)
ANSWER_MARKER = "Answer:"

Mode = Literal["sparse", "dense"]
MODES = ("sparse", "dense")


# ----------------------------------------------------------------------------- vocabulary


def add_return_tokens(
    tokenizer: Any,
    params: Any,
    model_config: ModelConfig,
    tokens: Sequence[str] = RETURN_TOKENS,
    like: Sequence[str] | None = None,
) -> tuple[Any, Any, ModelConfig]:
    """(tokenizer, params, config) that know the return tokens.

    The tokenizer (a copy; the argument is not mutated) gains the missing
    tokens as special tokens: never split, skipped by
    ``decode(skip_special_tokens=True)``, ids from ``len(tokenizer)`` on, so
    every existing id is unchanged. The embedding (and an untied ``lm_head``)
    grows to cover the new ids; rows of the tokens added now, and rows the
    matrix grows by, are set to the mean of the existing tokens' rows -- a
    new token starts as "an average token", so the logits of old tokens are
    untouched and the new ones start at a typical logit, not at a random one.
    Idempotent: tokens the tokenizer already has keep their ids and rows
    (only rows the matrix lacks are added). ``params`` are unboxed
    ({"params": {...}}), scanned or unrolled (the embedding is outside the
    layers).

    `like` (a word per token) starts each token added now as its word instead:
    the mean of the rows of the word's tokens. A frozen base (LoRA) cannot
    learn two mean rows apart; rows that start apart, and mean something, the
    adapters can learn to read (`RETURN_WORDS`).
    """
    like_ids = {}
    if like is not None:
        like_ids = {
            t: tokenizer.encode(w, add_special_tokens=False)
            for t, w in zip(tokens, like, strict=True)
        }
        if not all(like_ids.values()) or len({tuple(i) for i in like_ids.values()}) < len(tokens):
            raise ValueError(f"{like} must encode to tokens, each word to its own: {like_ids}")
    old_length = len(tokenizer)
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    old_vocab = model_config.vocab_size
    new_vocab = max(old_vocab, max(ids) + 1)
    added_ids = {tokenizer.convert_tokens_to_ids(t) for t in missing}
    fresh = sorted(added_ids | set(range(old_vocab, new_vocab)))
    if not fresh:
        return tokenizer, params, model_config

    # The rows the mean is taken over: real tokens that are not return tokens.
    source = np.zeros(old_vocab, bool)
    source[: min(old_vocab, old_length)] = True
    source[[i for i in ids if i < old_vocab]] = False

    def grow(table: Any, vocab_axis: int) -> Any:
        rows = jnp.moveaxis(jnp.asarray(table), vocab_axis, 0)  # [V, E]
        chex.assert_axis_dimension(rows, 0, old_vocab)
        mean = rows[np.flatnonzero(source)].astype(jnp.float32).mean(axis=0).astype(rows.dtype)
        extra = jnp.zeros((new_vocab - old_vocab, rows.shape[1]), rows.dtype)
        rows = jnp.concatenate([rows, extra])
        rows = rows.at[np.asarray(fresh)].set(mean)
        for token in missing:
            if token in like_ids:
                word = rows[np.asarray(like_ids[token])].astype(jnp.float32).mean(axis=0)
                rows = rows.at[tokenizer.convert_tokens_to_ids(token)].set(word.astype(rows.dtype))
        return jnp.moveaxis(rows, 0, vocab_axis)

    inner = dict(params["params"])
    inner["embedder"] = {**inner["embedder"], "embedding": grow(inner["embedder"]["embedding"], 0)}
    if not model_config.tie_embeddings:
        inner["lm_head"] = grow(inner["lm_head"], 1)
    return tokenizer, {**params, "params": inner}, model_config.replace(vocab_size=new_vocab)


def return_token_ids(tokenizer: Any, tokens: Sequence[str] = RETURN_TOKENS) -> list[int]:
    """The ids of the return tokens; ValueError if the tokenizer lacks one."""
    vocab = tokenizer.get_vocab()
    absent = [t for t in tokens if t not in vocab]
    if absent:
        raise ValueError(f"the tokenizer has no {absent}; call add_return_tokens first")
    return [vocab[t] for t in tokens]


def line_end_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids of the tokens whose text ends a line (ends with "\\n"), sorted.

    A step of a solution is a line (``split_steps``), so these are the
    tokens after which a new step starts and dense RCRL's return token goes.
    """
    ids = range(len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in ids])
    return tuple(i for i, text in zip(ids, texts) if text.endswith("\n"))


def step_conditioning(tokenizer: Any, token: str) -> dict[str, Any]:
    """Sampling options (``SamplingConfig`` fields) that put ``token`` before every step.

    A dense RCRL model learnt every step after its own return token; asking
    it for a good solution means giving it the good token where each step
    starts, not only the first (which :func:`condition_prompt` places).
    """
    (token_id,) = return_token_ids(tokenizer, (token,))
    return {"step_token": token_id, "step_starts": line_end_ids(tokenizer)}


def strip_return_tokens(text: str, tokens: Sequence[str] = RETURN_TOKENS) -> str:
    """``text`` without any return token (e.g. a decoded sample before rewarding it)."""
    for token in tokens:
        text = text.replace(token, "")
    return text


# ----------------------------------------------------------------------------- text


def condition_prompt(prompt: str, token: str) -> str:
    """``prompt`` with ``token`` right after its last "Answer:", where the solution starts.

    House prompts end with "Answer:", so this appends the token; a prompt
    without the marker gets it at its end (where the solution starts too).
    """
    at = prompt.rfind(ANSWER_MARKER)
    at = len(prompt) if at < 0 else at + len(ANSWER_MARKER)
    return prompt[:at] + token + prompt[at:]


@dataclasses.dataclass(frozen=True)
class RcrlSample:
    """One sampled solution with its reward (sparse) and per-step rewards (dense).

    ``step_rewards[k]`` is the reward of the k-th step of ``completion``
    (``split_steps``), e.g. from :func:`per_step_rewards`. ``prompt`` is the
    unconditioned prompt (the return token is placed by
    :func:`conditioned_pair`); ``question_id`` and ``round`` say which train
    question and which round, so that a run's RCRL dataset accumulates and
    deduplicates like Expert Iteration's (``expert_iteration.accumulate``) and
    is stored in the same checksummed JSON lines (``to_jsonl(..., RcrlSample)``).
    """

    FORMAT: ClassVar[str] = "rl_reason.rcrl.dataset"

    prompt: str
    completion: str
    reward: float
    step_rewards: tuple[float, ...] | None = None
    question_id: int = 0
    round: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (plain str/int/float values; step_rewards a list or None)."""
        steps = None if self.step_rewards is None else [float(r) for r in self.step_rewards]
        return {
            "question_id": int(self.question_id),
            "prompt": self.prompt,
            "completion": self.completion,
            "reward": float(self.reward),
            "step_rewards": steps,
            "round": int(self.round),
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> RcrlSample:
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(record) != fields:
            raise ValueError(f"an RcrlSample has fields {sorted(fields)}, got {sorted(record)}")
        steps = record["step_rewards"]
        return cls(
            prompt=str(record["prompt"]),
            completion=str(record["completion"]),
            reward=float(record["reward"]),
            step_rewards=None if steps is None else tuple(float(r) for r in steps),
            question_id=int(record["question_id"]),
            round=int(record["round"]),
        )


def label_samples(
    question_ids: Sequence[int],
    prompts: Sequence[str],
    completions: Sequence[str],
    rewards: Sequence[float],
    *,
    round: int,
    step_rewards_fn: Callable[[list[str]], Sequence[Sequence[tuple[int, float]]]] | None = None,
    cut: bool = True,
) -> list[RcrlSample]:
    """Every sample as an :class:`RcrlSample`, good and bad alike (RCRL keeps them all).

    ``rewards`` are the samples' returns, judged on the sampled text (the
    sparse label). With ``cut`` each completion is cut after its answer
    (``expert_iteration.cut_at_answer``: what a model writes after its answer
    is junk it should not learn, whatever the return; the cut never changes
    the answer). ``step_rewards_fn`` (dense RCRL) maps the completions as
    stored (cut) to (character offset, reward) pairs per completion, e.g. a
    composed reward's ``.dense``; they are summed per step by
    :func:`per_step_rewards`, so every step's label describes the stored text.
    """
    n = len(completions)
    columns = {"question_ids": question_ids, "prompts": prompts, "rewards": rewards}
    for name, column in columns.items():
        if len(column) != n:
            raise ValueError(f"{name} has {len(column)} entries for {n} completions")
    texts = [ei.cut_at_answer(text) if cut else text for text in completions]
    dense = None if step_rewards_fn is None else list(step_rewards_fn(texts))
    if dense is not None and len(dense) != n:
        raise ValueError(f"step_rewards_fn gave {len(dense)} rows for {n} completions")
    return [
        RcrlSample(
            prompt,
            text,
            float(reward),
            None if dense is None else per_step_rewards(text, dense[i]),
            int(qid),
            int(round),
        )
        for i, (qid, prompt, text, reward) in enumerate(zip(question_ids, prompts, texts, rewards))
    ]


def label_summary(
    samples: Sequence[RcrlSample], *, threshold: float, step_threshold: float | None = None
) -> dict[str, float]:
    """What a set of labelled samples holds, for a run's log: the fraction whose return
    reaches ``threshold`` (good under sparse labels) and, for samples with step
    rewards, the fraction of steps whose reward reaches ``step_threshold``."""
    out = {"good_fraction": float(np.mean([s.reward >= threshold for s in samples] or [0.0]))}
    steps = [r for s in samples if s.step_rewards is not None for r in s.step_rewards]
    if step_threshold is not None and steps:
        out["good_step_fraction"] = float(np.mean(np.asarray(steps) >= step_threshold))
    return out


def per_step_rewards(completion: str, dense: Sequence[tuple[int, float]]) -> tuple[float, ...]:
    """Dense (character offset, reward) pairs summed per step of ``completion``.

    A reward paid at offset c belongs to the first step that ends at or
    after c (rewards are paid at step ends); one past the last step goes to
    the last step. Step-match credit and ORM step scores both pay at step
    ends, so each step gets exactly its own value.
    """
    ends = [step.end for step in split_steps(completion)]
    totals = [0.0] * len(ends)
    for offset, reward in dense:
        if not ends:
            break
        k = next((i for i, end in enumerate(ends) if offset <= end), len(ends) - 1)
        totals[k] += float(reward)
    return tuple(totals)


def _label(value: float, threshold: float, tokens: Sequence[str]) -> str:
    good, bad = tokens
    return good if value >= threshold else bad


def conditioned_pair(
    sample: RcrlSample,
    mode: Mode,
    *,
    threshold: float,
    tokens: Sequence[str] = RETURN_TOKENS,
) -> tuple[str, str]:
    """The (prompt, completion) texts of one RCRL training pair, return tokens in place.

    The completion is in the house template (``templates.format_completion``:
    one space, then the solution), so RCRL trains like SFT and EI. Sparse:
    one token after "Answer:", good when ``reward >= threshold``. Dense: a
    token at the start of every step, good when that step's reward is
    ``>= threshold``; the first step starts the completion, so its token
    sits after "Answer:" as in sparse mode. A dense sample without steps
    (an empty solution) is labelled by its reward, as in sparse mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    completion = templates.format_completion(sample.completion)
    steps = split_steps(completion)
    if mode == "sparse" or not steps:
        return condition_prompt(sample.prompt, _label(sample.reward, threshold, tokens)), completion
    if sample.step_rewards is None or len(sample.step_rewards) != len(steps):
        given = None if sample.step_rewards is None else len(sample.step_rewards)
        raise ValueError(
            f"dense RCRL needs one reward per step: {len(steps)} steps, {given} rewards"
        )
    labels = [_label(r, threshold, tokens) for r in sample.step_rewards]
    starts = [step.end - len(step.text) for step in steps]
    assert starts[0] == 0, "format_completion's text starts with its first step"
    pieces = [completion[start:end] for start, end in zip(starts, [*starts[1:], len(completion)])]
    body = "".join(label + piece for label, piece in zip(labels[1:], pieces[1:]))
    return condition_prompt(sample.prompt, labels[0]), pieces[0] + body


def rcrl_arrays(
    tokenizer: Any,
    samples: Sequence[RcrlSample],
    max_length: int,
    mode: Mode,
    *,
    threshold: float,
    tokens: Sequence[str] = RETURN_TOKENS,
) -> tuple[dict[str, np.ndarray], int]:
    """{tokens, input_mask, loss_mask} [len(samples), max_length] for ``sft_step``, and the
    count of rows cut at max_length.

    Pairs are :func:`conditioned_pair` encoded by ``data.sft.encode_pair``;
    positions holding a return token are removed from the loss mask, so the
    model learns the solution given its return, never to emit the return.
    """
    return_ids = return_token_ids(tokenizer, tokens)
    texts = [conditioned_pair(s, mode, threshold=threshold, tokens=tokens) for s in samples]
    pairs = [sft_data.encode_pair(tokenizer, prompt, completion) for prompt, completion in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    arrays, truncated = sft_data.pack_pairs(pairs, max_length, pad_id)
    arrays["loss_mask"] &= ~np.isin(arrays["tokens"], return_ids)
    return arrays, truncated

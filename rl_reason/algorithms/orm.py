"""The outcome reward model (ORM): training step, scores, and the batched scorer.

As in Cobbe et al. (2021) and the study: a scalar head on the language model
reads, after every token of a solution, the probability that the solution's
final answer is correct. It is trained with per-token binary cross-entropy
against the whole solution's label, so its score at any prefix estimates the
solution's outcome; rewards/orm.py turns those scores into sparse (final
token) or dense (end of every step) rewards through the Scorer contract,
which :class:`BatchedOrmScorer` implements.

Sequences are encoded exactly like SFT pairs (``data.sft.encode_pair``) but
without the EOS: the score the ORM is trained to give at the last completion
token is the one the scorer reads at ``len(completion)``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from rl_reason.algorithms.logprobs import token_logprobs
from rl_reason.algorithms.microbatch import accumulate_gradients
from rl_reason.algorithms.sft import target_weights
from rl_reason.algorithms.train_state import TrainState
from rl_reason.data import sft as sft_data
from rl_reason.evaluation.evaluate import evaluate as score_samples
from rl_reason.models.config import ModelConfig
from rl_reason.models.transformer import SCALAR_HEADS, Transformer, default_positions
from rl_reason.parallel import sharding as shd
from rl_reason.rewards.functions import Batch as RewardBatch
from rl_reason.rewards.functions import column
from rl_reason.rewards.token_positions import char_to_token_positions, token_starts
from rl_reason.sampling.engine import pick_bucket

Batch = dict[str, jax.Array]
ORM_HEAD = "orm"

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- loss and step


def completion_weights(batch: Batch) -> jax.Array:
    """[N, L] float32: 1 at the completion's real tokens (the positions the ORM is trained on)."""
    return (batch["loss_mask"] & batch["input_mask"]).astype(jnp.float32)


def is_positive(labels: jax.Array) -> jax.Array:
    """A label counts as the positive class when it is above 1/2 (labels are 0/1 in practice)."""
    return labels > 0.5


def class_normalizer(batch: Batch) -> jax.Array:
    """[2] float32 (negative, positive): C * T_c, the divisor of class c's token losses.

    T_c is the number of completion tokens in sequences of class c and C the
    number of classes present in the batch (1 or 2). The loss is

        sum_c  1 / (C * T_c)  *  sum_{tokens t of class-c sequences}  BCE_t,

    so each present class carries weight 1/C of the loss whatever its share
    of the batch (a policy that is right 90% of the time must not teach the
    ORM to say "correct" everywhere), tokens within a class weigh the same
    (Cobbe et al.'s token mean), and with balanced classes of equal lengths
    it is the plain token mean. Computed on the whole batch, so gradient
    accumulation over micro-batches gives exactly the full-batch gradient.
    """
    weights = completion_weights(batch).sum(axis=1)
    positive = is_positive(batch["labels"])
    tokens = jnp.stack(
        [jnp.where(positive, 0.0, weights).sum(), jnp.where(positive, weights, 0.0).sum()]
    )
    classes = (tokens > 0).sum().astype(jnp.float32)
    return jnp.maximum(classes * tokens, 1.0)


def last_completion_index(loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[N] index of each row's last completion token, and [N] whether the row has one."""
    length = loss_mask.shape[1]
    last = length - 1 - jnp.argmax(loss_mask[:, ::-1], axis=1)
    return last, loss_mask.any(axis=1)


def final_scores(scores: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """[N] the score at each row's last completion token (NaN for a row with none)."""
    last, has_completion = last_completion_index(loss_mask)
    picked = jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]
    return jnp.where(has_completion, picked, jnp.nan)


def orm_logits(
    model: Transformer, params: Any, tokens: jax.Array, input_mask: jax.Array, head: str = ORM_HEAD
) -> jax.Array:
    """[N, L] float32 logits of the head after every token (no vocabulary projection)."""
    out = model.apply(params, tokens, default_positions(input_mask), input_mask)
    logits = out.heads[head].astype(jnp.float32)
    chex.assert_shape(logits, tokens.shape)
    return logits


def lm_normalizer(batch: Batch) -> jax.Array:
    """The count of completion tokens of correct solutions (at least 1): the divisor of the
    auxiliary language-modelling loss, over the whole batch like :func:`class_normalizer`."""
    weights = target_weights(batch) * is_positive(batch["labels"])[:, None]
    return jnp.maximum(weights.sum(), 1.0)


def orm_loss(
    params: Any,
    batch: Batch,
    model: Transformer,
    normalizer: jax.Array,
    head: str = ORM_HEAD,
    lm_weight: float = 0.0,
    lm_normalizer: jax.Array | float = 1.0,
    chunk_size: int = 256,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Class-balanced per-token BCE (see :func:`class_normalizer`), float32, plus
    ``lm_weight`` times the language-modelling loss on the correct solutions.

    batch: tokens, input_mask, loss_mask [N, L]; labels [N] (1 = the final
    answer is correct). Every completion token t is trained towards the
    label: heads[t] is the score of the text up to and including token t.

    The auxiliary loss is Cobbe et al.'s (2021), who found a verifier
    trained jointly with the language-modelling objective judges better: to
    tell a right solution from a wrong one of the same question the head
    has to see where a written token departs from what the model would have
    written, and the LM loss keeps that next-token knowledge in the trunk.
    (On the synthetic task it did not help; docs/results-synthetic.md.) It is taken on correct
    solutions only (the token mean over them, ``lm_normalizer``): the
    incorrect ones would teach their errors. The aux values are sums, so
    micro-batches add up.
    """
    if lm_weight:  # one forward pass gives the head and the next-token scores
        scored = token_logprobs(
            model, params, batch["tokens"], batch["input_mask"], chunk_size=chunk_size
        )
        logits = scored.heads[head].astype(jnp.float32)
        lm_weights = target_weights(batch) * is_positive(batch["labels"])[:, None]
        lm_nll = -(scored.logprobs * lm_weights).sum()
    else:
        logits = orm_logits(model, params, batch["tokens"], batch["input_mask"], head)
        lm_nll = jnp.zeros((), jnp.float32)
    labels = batch["labels"].astype(jnp.float32)
    chex.assert_shape(labels, (logits.shape[0],))
    positive = is_positive(labels)
    mask = completion_weights(batch)
    weights = mask / normalizer[positive.astype(jnp.int32)][:, None]
    targets = jnp.broadcast_to(labels[:, None], logits.shape)
    bce = optax.sigmoid_binary_cross_entropy(logits, targets)
    bce_loss = (weights * bce).sum()
    loss = bce_loss + lm_weight * lm_nll / lm_normalizer
    final = final_scores(logits, batch["loss_mask"] & batch["input_mask"])
    has_completion = ~jnp.isnan(final)
    hits = jnp.where(has_completion, (final > 0) == positive, False)
    aux = {
        "final_hits": hits.sum().astype(jnp.float32),
        "final_count": has_completion.sum().astype(jnp.float32),
        "prediction_sum": (jax.nn.sigmoid(logits) * mask).sum(),
        "token_count": mask.sum(),
        "bce": bce_loss,
        "lm_nll_sum": lm_nll,
    }
    return loss, aux


def orm_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Transformer,
    tx: optax.GradientTransformation,
    num_microbatches: int = 1,
    lr_schedule: Optional[optax.Schedule] = None,
    head: str = ORM_HEAD,
    lm_weight: float = 0.0,
    chunk_size: int = 256,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update of the ORM from {tokens, input_mask, loss_mask, labels}.

    ``lm_weight`` > 0 adds the language-modelling loss on the correct
    solutions (:func:`orm_loss`; its logits are computed ``chunk_size``
    positions at a time). Metrics: loss, bce, lm_loss (with ``lm_weight``:
    the token-mean NLL of the correct solutions), final_accuracy (the sign
    of the final-token logit against the label), mean_prediction (over
    completion tokens), positive_fraction, grad_norm, param_norm, finite
    (1.0 when the loss, the gradient norm and the new parameter norm are all
    finite, else 0.0: the loop's cue to stop before a bad state reaches a
    checkpoint), and lr with a schedule.
    """
    normalizer, lm_count = class_normalizer(batch), lm_normalizer(batch)
    loss_fn = lambda params, micro: orm_loss(
        params, micro, model, normalizer, head, lm_weight, lm_count, chunk_size
    )
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(params, micro):
        (loss, aux), grads = value_and_grad(params, micro)
        return grads, {**aux, "loss": loss}

    grads, aux = accumulate_gradients(grad_fn, state.params, batch, num_microbatches)
    loss = aux["loss"]
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    param_norm = optax.tree.norm(params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    metrics = {
        "loss": loss,
        "bce": aux["bce"],
        "final_accuracy": aux["final_hits"] / jnp.maximum(aux["final_count"], 1.0),
        "mean_prediction": aux["prediction_sum"] / jnp.maximum(aux["token_count"], 1.0),
        "positive_fraction": is_positive(batch["labels"]).mean(dtype=jnp.float32),
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "finite": finite.astype(jnp.float32),
        "target_tokens": aux["token_count"],
    }
    if lm_weight:
        metrics["lm_loss"] = aux["lm_nll_sum"] / lm_count
    if lr_schedule is not None:
        metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    rng, _ = jax.random.split(state.rng)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


def make_orm_step(model: Transformer, tx: optax.GradientTransformation, **options) -> Any:
    """Binds the static parts, leaving the pure `step(state, batch)`."""
    return functools.partial(orm_step, model=model, tx=tx, **options)


# ----------------------------------------------------------------------------- scores


def orm_scores(
    model: Transformer, params: Any, tokens: jax.Array, input_mask: jax.Array, head: str = ORM_HEAD
) -> jax.Array:
    """[N, L] float32 sigmoid probabilities after every token (padding positions included)."""
    return jax.nn.sigmoid(orm_logits(model, params, tokens, input_mask, head))


orm_scores_jit = jax.jit(orm_scores, static_argnames=("model", "head"))


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve: P(a positive outscores a negative), ties counting 1/2.

    Computed as the Mann-Whitney U statistic with average ranks for tied
    scores. Labels above 1/2 are positive. Raises ValueError when a class is
    missing (the AUC is undefined) or a score is NaN.
    """
    scores = np.asarray(scores, np.float64).ravel()
    positive = np.asarray(labels, np.float64).ravel() > 0.5
    if scores.shape != positive.shape:
        raise ValueError(f"{scores.size} scores for {positive.size} labels")
    if np.isnan(scores).any():
        raise ValueError("roc_auc got a NaN score")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs both classes, got {n_pos} positive and {n_neg} negative")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    average_rank = upper - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def within_group_auc(
    scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray, group_size: int
) -> float:
    """P(a positive outscores a negative of the same group), pooled over every
    (positive, negative) pair that shares a group; ties count 1/2.

    Consecutive runs of ``group_size`` entries are one group (one question's
    K samples). This is what reranking needs: an ORM that has only learned
    which questions are hard reaches a high :func:`roc_auc` over all samples
    while this stays near 1/2. Raises ValueError when no group holds both classes.
    """
    scores = np.asarray(scores, np.float64).ravel()
    positive = np.asarray(labels, np.float64).ravel() > 0.5
    if scores.size != positive.size or scores.size % group_size:
        raise ValueError(f"{scores.size} scores, {positive.size} labels, groups of {group_size}")
    wins = pairs = 0.0
    for s, p in zip(scores.reshape(-1, group_size), positive.reshape(-1, group_size)):
        n_pos = int(p.sum())
        if 0 < n_pos < group_size:
            count = n_pos * (group_size - n_pos)
            wins += roc_auc(s, p) * count
            pairs += count
    if not pairs:
        raise ValueError("within_group_auc needs a group with both classes")
    return wins / pairs


# ----------------------------------------------------------------------------- data


def encode_for_orm(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """``sft.encode_pair`` without the EOS: the ORM judges the text, not its end marker."""
    prompt_ids, completion_ids = sft_data.encode_pair(tokenizer, prompt, completion)
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids[:-1]
    return prompt_ids, completion_ids


def orm_arrays(
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    labels: Sequence[float],
    max_length: int,
) -> tuple[dict[str, np.ndarray], int]:
    """An ORM batch {tokens, input_mask, loss_mask [N, max_length], labels [N] float32},
    and how many rows were cut at max_length (their last tokens are lost, so
    their final score is not the whole solution's: report it).

    ``completions`` are the sampled texts as the scorer will see them.
    """
    if not len(prompts) == len(completions) == len(labels):
        raise ValueError(
            f"{len(prompts)} prompts, {len(completions)} completions, {len(labels)} labels"
        )
    pairs = [encode_for_orm(tokenizer, p, c) for p, c in zip(prompts, completions)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    arrays, truncated = sft_data.pack_pairs(pairs, max_length, pad_id)
    arrays["labels"] = np.asarray(labels, np.float32)
    return arrays, truncated


def balanced_within_questions(
    question_ids: Sequence[int], labels: Sequence[float], one_sided: int = 0
) -> np.ndarray:
    """Indices of a subset in which every question with both outcomes holds as many
    correct as incorrect samples: its first min(#correct, #incorrect) of each
    class, in the given order; of a question whose samples are all right or all
    wrong, its first ``one_sided`` samples.

    An ORM used to rerank the K samples of one question must tell them apart;
    trained on every sample, it learns first (and mostly) which questions are
    hard -- the cheapest way down the loss, since many questions are all right
    or all wrong -- and ranks the samples of one question barely above chance.
    On the balanced questions how hard a question looks predicts nothing; only
    what differs between its solutions does. A few samples of the one-sided
    questions (``one_sided``) keep some of the question-level signal an ORM
    also needs as a reward or a score across questions.
    """
    positive = np.asarray(labels, np.float64) > 0.5
    question_ids = np.asarray(question_ids)
    if positive.shape != question_ids.shape:
        raise ValueError(f"{question_ids.size} question ids for {positive.size} labels")
    if one_sided < 0:
        raise ValueError(f"one_sided must not be negative, got {one_sided}")
    keep = []
    for question in np.unique(question_ids):
        rows = np.flatnonzero(question_ids == question)
        right, wrong = rows[positive[rows]], rows[~positive[rows]]
        n = min(len(right), len(wrong))
        keep += [*right[:n], *wrong[:n]] if n else list(rows[:one_sided])
    return np.sort(np.asarray(keep, np.int64))


# ----------------------------------------------------------------------------- the scorer


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity: it holds params
class BatchedOrmScorer:
    """The rewards/orm.py Scorer on one jitted ORM forward: ``scorer(completions, batch, offsets)``.

    ``batch[prompt_column]`` holds each completion's exact prompt text. Every
    (prompt, completion) is encoded as :func:`encode_for_orm`, rows are sorted
    by length, cut into batches of ``batch_size`` (the last filled with empty
    rows) and right-padded to the smallest of ``length_buckets`` that holds
    them, so a whole run compiles at most ``len(length_buckets)`` programs.
    The score for character offset ``c`` is read at the completion token that
    completes ``completion[:c]`` (``char_to_token_positions`` on the
    completion's token starts); for ``c <= 0`` (no completion text yet) it is
    read at the prompt's last token. A sequence longer than the largest
    bucket loses the start of its prompt; an offset whose token was cut is
    read at the first kept token. Replace ``params`` with
    ``dataclasses.replace(scorer, params=...)``; the compiled program is kept.
    """

    model: Transformer
    params: Any
    tokenizer: Any
    batch_size: int = 32
    length_buckets: tuple[int, ...] = (128, 256, 512, 1024)
    prompt_column: str = "prompt"
    head: str = ORM_HEAD
    mesh: Optional[Mesh] = None
    rules: shd.Rules = shd.DEFAULT_RULES

    def __post_init__(self):
        if self.head not in self.model.config.heads:
            raise ValueError(f"the model has heads {self.model.config.heads}, not {self.head!r}")
        if self.mesh is not None:
            shd.check_batch_divides(self.batch_size, self.mesh, "ORM scoring batch")

    def __call__(
        self,
        completions: Sequence[str],
        batch: RewardBatch,
        offsets: Sequence[Sequence[int]],
    ) -> list[list[float]]:
        n = len(completions)
        prompts = column(batch, self.prompt_column, n)
        if len(offsets) != n:
            raise ValueError(f"{len(offsets)} offset lists for {n} completions")
        if n == 0:
            return []
        ids, positions = self.encode(prompts, completions, offsets)
        out: list[list[float]] = [[] for _ in range(n)]
        order = sorted(range(n), key=lambda i: len(ids[i]))
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
            scores = self._score_rows([ids[i] for i in rows])
            for k, i in enumerate(rows):
                out[i] = [float(scores[k, p]) for p in positions[i]]
        return out

    def encode(
        self, prompts: Sequence[str], completions: Sequence[str], offsets: Sequence[Sequence[int]]
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Each row's token ids (cut to the largest bucket) and the position to read per offset."""
        max_length = max(self.length_buckets)
        starts = token_starts(self.tokenizer, completions)
        ids, positions = [], []
        cut_rows = 0
        rows = zip(prompts, completions, starts, offsets)
        for prompt, completion, row_starts, row_offsets in rows:
            prompt_ids, completion_ids = encode_for_orm(self.tokenizer, str(prompt), completion)
            if len(completion_ids) != len(row_starts):
                raise ValueError("the tokenizer's offset mapping disagrees with its token ids")
            tokens = prompt_ids + completion_ids
            first = len(prompt_ids)
            wanted = [
                first + p if c > 0 and completion_ids else first - 1
                for c, p in zip(row_offsets, char_to_token_positions(row_starts, row_offsets))
            ]
            cut = max(len(tokens) - max_length, 0)
            cut_rows += cut > 0
            ids.append(tokens[cut:])
            positions.append([max(p - cut, 0) for p in wanted])
        if cut_rows:
            _log.warning(
                "%d ORM inputs are longer than the largest bucket (%d tokens); "
                "their starts are cut.",
                cut_rows,
                max_length,
            )
        return ids, positions

    def _score_rows(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """[batch_size, bucket] scores of up to batch_size rows (right-padded, empty rows added)."""
        length = pick_bucket(max(len(r) for r in rows), self.length_buckets)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        tokens = np.full((self.batch_size, length), pad_id, np.int32)
        mask = np.zeros((self.batch_size, length), bool)
        for k, row in enumerate(rows):
            tokens[k, : len(row)] = row
            mask[k, : len(row)] = True
        with shd.activation_sharding(self.mesh, self.rules):
            if self.mesh is not None:
                tokens, mask = shd.shard_batch((tokens, mask), self.mesh)
            scores = orm_scores_jit(self.model, self.params, tokens, mask, self.head)
        return shd.to_host(scores)


# ----------------------------------------------------------------------------- params


def head_param_name(name: str) -> str:
    """Where Transformer keeps scalar head ``name``'s Dense params (a dict attribute in setup)."""
    return f"{SCALAR_HEADS}_{name}"


def add_head(
    params: Any, model_config: ModelConfig, name: str, rng: jax.Array
) -> tuple[Any, ModelConfig]:
    """(params, config) with a freshly initialised scalar head ``name`` added.

    Imported HF/GGUF weights have no heads. The new head is initialised like
    Transformer's own (kernel ~ normal(init_std), zero bias, param dtype);
    every other parameter is the same object as before. A no-op when the
    params and config already have the head. ``params`` are unboxed
    ({"params": {...}}), scanned or unrolled.
    """
    key = head_param_name(name)
    heads = model_config.heads if name in model_config.heads else (*model_config.heads, name)
    config = model_config.replace(heads=heads)
    if key in params["params"]:
        return params, config
    abstract = jax.eval_shape(
        lambda: nn.meta.unbox(
            Transformer(config).init(
                jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32)
            )
        )
    )["params"][key]
    dtype = config.weights_dtype
    head = {
        "kernel": nn.initializers.normal(config.init_std)(rng, (config.hidden_dim, 1), dtype),
        "bias": jnp.zeros((1,), dtype),
    }
    chex.assert_trees_all_equal_shapes_and_dtypes(head, abstract)
    return {**params, "params": {**params["params"], key: head}}, config


# --- measuring an ORM on K samples per question ------------------------------


def measure(
    scorer: BatchedOrmScorer,
    samples: Sequence[Any],
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
        out["auc"] = roc_auc(scores, labels)
        if any(0 < row.sum() < k for row in labels.reshape(-1, k)):
            out["within_question_auc"] = within_group_auc(scores, labels, k)
    grouped = [texts[i : i + k] for i in range(0, len(texts), k)]
    grouped_scores = [scores[i : i + k].tolist() for i in range(0, len(texts), k)]
    out.update(score_samples(grouped, golds, scores=grouped_scores))
    return out


def selection_score(figures: dict[str, float]) -> float | None:
    """What picks the run's ORM on the validation samples: the within-question AUC
    (the overall AUC when no validation question has both outcomes; None when
    neither is defined)."""
    return figures.get("within_question_auc", figures.get("auc"))

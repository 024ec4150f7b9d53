"""Per-token log-probabilities without materialising [batch, length, vocab] logits.

Every algorithm needs log p(token_t | tokens_<t): SFT and EI as a loss, PPO
for its ratio, the KL penalty against the reference model. The unembedding is
applied to one chunk of positions at a time under `jax.checkpoint`, so the
forward and the backward pass hold at most [batch, chunk, vocab] float32
logits; with Gemma 3's 262k vocabulary that is the difference between
megabytes and gigabytes. The policy's entropy, which PPO's entropy bonus
needs over the whole vocabulary, is computed inside the same chunks.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rl_reason.models.transformer import KVCache, Transformer, TransformerOutput, default_positions


@flax.struct.dataclass
class TokenLogProbs:
    """Aligned with the tokens: entry t scores tokens[:, t] given tokens[:, :t].

    Entry 0 has no context and is 0 / False; mask it out.
    """

    logprobs: jax.Array  # [B, T] float32
    is_argmax: jax.Array  # [B, T] bool, the token is the model's top choice
    heads: dict[str, jax.Array]  # scalar heads at every position, [B, T]
    # Entropy of the distribution token t was drawn from, [B, T] float32, when asked for.
    entropy: Optional[jax.Array] = None


class SharedPrompts(NamedTuple):
    """The first `columns` columns of each `rows` consecutive rows are one prompt (a
    rollout's K samples of it): a forward runs them once per group and every row's
    remaining columns read their keys and values (`Transformer(..., groups=)`), the
    same attention without the K copies of the prompt's work. `columns` must leave
    each row's first completion token after it (its score comes from the column
    before); the outputs over those columns are zeros.

    `prompts` > 0: the rows come in any order from at most `prompts` prompts (an
    update's shuffled minibatch) and `prompt_ids` [B] names each row's; the forward
    runs each prompt present once and every row reads its prompt's keys."""

    columns: int
    rows: int
    prompts: int = 0

    @classmethod
    def find(
        cls, tokens: Any, input_mask: Any, k: int, prompt_columns: int, multiple: int = 16
    ) -> SharedPrompts | None:
        """The layout of a batch whose K consecutive rows sample one prompt each, held in
        its first `prompt_columns` columns (host arrays [B, T]): those columns but the
        last (its token scores the first completion token), rounded down to a multiple
        of `multiple` (one program per width), or None when that leaves none, K is 1,
        the rows are not groups of K, or some group's rows differ there."""
        columns = (prompt_columns - 1) // max(multiple, 1) * max(multiple, 1)
        if k == 1 or columns <= 0 or len(tokens) % k:
            return None
        for x in (tokens, input_mask):
            group = np.asarray(x)[:, :columns].reshape(-1, k, columns)
            if not (group == group[:, :1]).all():
                return None
        return cls(columns, k)


def run_model(
    model: Transformer,
    params: Any,
    tokens: jax.Array,
    input_mask: jax.Array,
    shared: Optional[SharedPrompts] = None,
    prompt_ids: Optional[jax.Array] = None,
) -> tuple[TransformerOutput, int]:
    """(the model's output over tokens [B, T] from column `first` on, first): every
    column (first = 0), or with `shared` the columns after the shared prompts."""
    positions = default_positions(input_mask)
    if shared is None or shared.columns == 0:
        return model.apply(params, tokens, positions, input_mask), 0
    columns, rows, prompts = shared
    if prompts:
        if prompt_ids is None:
            raise ValueError("SharedPrompts(prompts > 0) reads each row's prompt_ids.")
        first_rows, row_prompt = distinct_prompts(prompt_ids, min(tokens.shape[0], prompts))
        head = lambda x: x[first_rows, :columns]
    else:
        head = lambda x: x[::rows, :columns]  # one row a group
    prompt = [head(x) for x in (tokens, positions, input_mask)]
    cache = KVCache.init(model.config, prompt[0].shape[0], columns)
    groups = model.apply(params, *prompt, cache=cache).cache
    if prompts:  # groups of one row: each row reads its prompt's keys
        groups = groups.take_rows(row_prompt)
    tail = lambda x: x[:, columns:]
    out = model.apply(params, tail(tokens), tail(positions), tail(input_mask), groups=groups)
    return out, columns


def distinct_prompts(prompt_ids: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """(a row of each distinct id [count], each row's entry in them [B]) for ids [B] of
    at most `count` distinct values; the first array repeats a row when there are fewer
    (a repeat no row reads)."""
    ids = jnp.unique(prompt_ids, size=count, fill_value=prompt_ids.max())  # sorted
    first_rows = jnp.argmax(prompt_ids[None, :] == ids[:, None], axis=1)
    return first_rows, jnp.searchsorted(ids, prompt_ids)


def pad_columns(x: jax.Array, columns: int, value=0) -> jax.Array:
    """x [B, T'] with `columns` columns of `value` before it."""
    return jnp.concatenate([jnp.full((x.shape[0], columns), value, x.dtype), x], axis=1)


def chunked_target_logprobs(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """log softmax(logits_fn(hidden))[targets] and argmax hits, chunk by chunk.

    hidden [B, T, E], targets [B, T] -> two [B, T] arrays.
    """
    logprobs, hits, _ = chunked_target_scores(logits_fn, hidden, targets, chunk_size)
    return logprobs, hits


def chunked_target_scores(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    chunk_size: int,
    with_entropy: bool = False,
    needed: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    """Target log-probs, argmax hits and (optionally) entropies [B, T], chunk by chunk.

    Each chunk's [B, chunk, V] logits live only inside one checkpointed
    `lax.map` step, in the forward and in the backward pass; the entropy
    H = logsumexp(z) - sum softmax(z) z reuses that chunk's logsumexp.
    `needed` [B, T] bool marks the positions whose scores are used (an RL
    loss reads the completion's, not the prompt's): a chunk with none is
    skipped, forward and backward, and scores 0. The others are computed as
    without it.
    """
    b, t, e = hidden.shape
    chunk = max(1, min(chunk_size, t))
    num_chunks = -(-t // chunk)
    pad = num_chunks * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden = hidden.reshape(b, num_chunks, chunk, e).swapaxes(0, 1)
    targets = targets.reshape(b, num_chunks, chunk).swapaxes(0, 1)
    if needed is not None:  # which chunks hold a needed position
        compute = jnp.pad(needed, ((0, 0), (0, pad))).reshape(b, num_chunks, chunk).any((0, 2))

    def one_chunk(args):
        h, tgt = args
        logits = logits_fn(h).astype(jnp.float32)
        log_normalizer = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        # A hit is a target at the top logit: a compare against the max that the
        # logsumexp takes anyway, not an argmax (an index reduction over the whole
        # vocabulary, 5% of a 32k-vocabulary step). A tie counts as a hit.
        hit = target_logit >= jnp.max(logits, axis=-1)
        scores = (target_logit - log_normalizer, hit)
        if with_entropy:
            probs = jnp.exp(logits - log_normalizer[..., None])
            scores += (log_normalizer - (probs * logits).sum(axis=-1),)
        return scores

    def skipped(args):
        h, _ = args
        zeros = jnp.zeros(h.shape[:2], jnp.float32)
        return (zeros, jnp.zeros(h.shape[:2], bool)) + ((zeros,) if with_entropy else ())

    if needed is None:
        scores = jax.lax.map(jax.checkpoint(one_chunk), (hidden, targets))
    else:  # the branch inside the checkpoint: the backward pass saves the chunk's inputs only
        scores = jax.lax.map(
            jax.checkpoint(lambda args: jax.lax.cond(args[2], one_chunk, skipped, args[:2])),
            (hidden, targets, compute),
        )
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, num_chunks * chunk)[:, :t]
    logprobs, hits = unchunk(scores[0]), unchunk(scores[1])
    return logprobs, hits, unchunk(scores[2]) if with_entropy else None


def token_logprobs(
    model: Transformer,
    params: Any,
    tokens: jax.Array,
    input_mask: jax.Array,
    *,
    chunk_size: int = 256,
    needed: Optional[jax.Array] = None,
    shared: Optional[SharedPrompts] = None,
) -> TokenLogProbs:
    """Runs the model over tokens [B, T] and scores every next token (those `needed`
    marks, when given: see score_tokens; `shared`: see SharedPrompts).

    Positions count real tokens only, so a left-padded prompt scores exactly as
    the sampler saw it.
    """
    return score_tokens(
        model, params, tokens, input_mask, chunk_size=chunk_size, needed=needed, shared=shared
    )


def score_tokens(
    model: Transformer,
    params: Any,
    tokens: jax.Array,
    input_mask: jax.Array,
    *,
    chunk_size: int = 256,
    with_entropy: bool = False,
    needed: Optional[jax.Array] = None,
    shared: Optional[SharedPrompts] = None,
    prompt_ids: Optional[jax.Array] = None,
) -> TokenLogProbs:
    """`token_logprobs`, plus the per-token entropy of the policy when with_entropy.

    One forward pass gives log-probs, entropies and the scalar heads (PPO's
    value head on the policy's trunk), all aligned with the tokens. `needed`
    [B, T] (aligned with the tokens) skips the unembedding of chunks of
    positions whose scores are not used (see chunked_target_scores). With
    `shared` (SharedPrompts; `prompt_ids` with it for rows in any order) the shared
    columns run once a prompt and score 0.
    """
    out, first = run_model(model, params, tokens, input_mask, shared, prompt_ids)
    logits_fn = lambda h: model.apply(params, h, method=Transformer.logits)
    logprobs, hits, entropy = chunked_target_scores(
        logits_fn,
        out.hidden[:, :-1],
        tokens[:, first + 1 :],
        chunk_size,
        with_entropy,
        None if needed is None else needed[:, first + 1 :],
    )
    pad = lambda x, value: pad_columns(x, first + 1, value)
    return TokenLogProbs(
        logprobs=pad(logprobs, 0.0),
        is_argmax=pad(hits, False),
        heads={name: pad_columns(h, first) for name, h in out.heads.items()},
        entropy=None if entropy is None else pad(entropy, 0.0),
    )

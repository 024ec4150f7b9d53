"""Per-token log-probabilities without materialising [batch, length, vocab] logits.

Every algorithm needs log p(token_t | tokens_<t): SFT and EI as a loss, PPO
for its ratio, the KL penalty against the reference model. The unembedding is
applied to one chunk of positions at a time under `jax.checkpoint`, so the
forward and the backward pass hold at most [batch, chunk, vocab] float32
logits; with Gemma 3's 262k vocabulary that is the difference between
megabytes and gigabytes.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from rl_reason.models.transformer import Transformer, default_positions


@flax.struct.dataclass
class TokenLogProbs:
    """Aligned with the tokens: entry t scores tokens[:, t] given tokens[:, :t].

    Entry 0 has no context and is 0 / False; mask it out.
    """

    logprobs: jax.Array  # [B, T] float32
    is_argmax: jax.Array  # [B, T] bool, the token is the model's top choice
    heads: dict[str, jax.Array]  # scalar heads at every position, [B, T]


def chunked_target_logprobs(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """log softmax(logits_fn(hidden))[targets] and argmax hits, chunk by chunk.

    hidden [B, T, E], targets [B, T] -> two [B, T] arrays.
    """
    b, t, e = hidden.shape
    chunk = max(1, min(chunk_size, t))
    num_chunks = -(-t // chunk)
    pad = num_chunks * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden = hidden.reshape(b, num_chunks, chunk, e).swapaxes(0, 1)
    targets = targets.reshape(b, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        h, tgt = args
        logits = logits_fn(h).astype(jnp.float32)
        target_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        logprob = target_logit - jax.nn.logsumexp(logits, axis=-1)
        return logprob, jnp.argmax(logits, axis=-1) == tgt

    logprobs, hits = jax.lax.map(one_chunk, (hidden, targets))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, num_chunks * chunk)[:, :t]
    return unchunk(logprobs), unchunk(hits)


def token_logprobs(
    model: Transformer,
    params: Any,
    tokens: jax.Array,
    input_mask: jax.Array,
    *,
    chunk_size: int = 256,
) -> TokenLogProbs:
    """Runs the model over tokens [B, T] and scores every next token.

    Positions count real tokens only, so a left-padded prompt scores exactly as
    the sampler saw it.
    """
    positions = default_positions(input_mask)
    out = model.apply(params, tokens, positions, input_mask)
    logits_fn = lambda h: model.apply(params, h, method=Transformer.logits)
    logprobs, hits = chunked_target_logprobs(
        logits_fn, out.hidden[:, :-1], tokens[:, 1:], chunk_size
    )
    pad = lambda x, value: jnp.concatenate([jnp.full((x.shape[0], 1), value, x.dtype), x], axis=1)
    return TokenLogProbs(logprobs=pad(logprobs, 0.0), is_argmax=pad(hits, False), heads=out.heads)

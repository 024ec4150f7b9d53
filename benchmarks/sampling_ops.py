"""Token choice, the per-step piece of decoding outside the model, against its textbook form.

    python benchmarks/sampling_ops.py

Token choice (`choose_tokens`) against `jax.random.categorical` with
sort-based top-p and `lax.top_k` (what tunix and most JAX samplers do), on a
llama_125m-sized step ([32, 32000]) and a Gemma 3 270M evaluation step
([80, 262144]). Each figure is the median of interleaved timed calls after a
warm-up call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from benchlib import median_ms  # benchmarks/ is on the path when run as a script

from rl_reason.sampling.sampler import SamplingConfig, choose_tokens


def textbook_choice(logits, keys, config: SamplingConfig):
    """Gumbel sampling after a sort-based nucleus and lax.top_k, log-probs by log_softmax."""
    logits = logits.astype(jnp.float32)
    policy = jax.nn.log_softmax(logits, axis=-1)
    if config.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        filtered = logits / config.temperature
        if config.top_k:
            kth = jax.lax.top_k(filtered, config.top_k)[0][:, -1:]
            filtered = jnp.where(filtered < kth, -jnp.inf, filtered)
        if config.top_p < 1:
            ordered = jnp.sort(filtered, axis=-1)[:, ::-1]
            probs = jax.nn.softmax(ordered, axis=-1)
            inside = jnp.cumsum(probs, axis=-1) - probs < config.top_p
            cutoff = jnp.min(jnp.where(inside, ordered, jnp.inf), axis=-1, keepdims=True)
            filtered = jnp.where(filtered < cutoff, -jnp.inf, filtered)
        tokens = jax.vmap(jax.random.categorical)(keys, filtered)
    return tokens, jnp.take_along_axis(policy, tokens[:, None], axis=-1)[:, 0]


def token_choice_table() -> list[str]:
    rows = []
    settings = {
        "greedy": SamplingConfig(temperature=0.0),
        "temperature 1": SamplingConfig(temperature=1.0),
        "top-p 0.95": SamplingConfig(temperature=0.7, top_p=0.95),
        "top-k 50": SamplingConfig(temperature=0.7, top_k=50),
    }
    for rows_, vocab in ((32, 32000), (80, 262144)):
        logits = 3 * jax.random.normal(jax.random.PRNGKey(0), (rows_, vocab))
        keys = jax.random.split(jax.random.PRNGKey(1), rows_)
        for name, config in settings.items():
            ms = median_ms(
                {
                    "ours": (
                        jax.jit(lambda x, k, c=config: choose_tokens(x, k, c)),
                        (logits, keys),
                    ),
                    "textbook": (
                        jax.jit(lambda x, k, c=config: textbook_choice(x, k, c)),
                        (logits, keys),
                    ),
                }
            )
            rows.append(
                f"| [{rows_}, {vocab}] | {name} | {ms['ours']:.1f} | {ms['textbook']:.1f} |"
                f" {ms['textbook'] / ms['ours']:.1f}x |"
            )
    return rows


def main():
    print("| logits | setting | ours ms | textbook ms | speed-up |")
    print("|---|---|---|---|---|")
    for row in token_choice_table():
        print(row, flush=True)


if __name__ == "__main__":
    main()

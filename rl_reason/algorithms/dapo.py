"""DAPO's rollout-side parts (Yu et al. 2025): dynamic sampling and overlong shaping.

DAPO is GRPO with four changes, each its own switch in rl_reason so that any
of them combines with GRPO (or any group estimator):

- clip-higher: `PPOConfig.clip_eps_high` (policy_losses.py);
- the token-level loss: `PPOConfig.loss_aggregation="token_mean"`;
- dynamic sampling: `rl.dynamic_sampling` — groups whose rewards are all equal
  carry no gradient under a group baseline, so they leave the batch and more
  prompts are sampled until it is full (`full_batch_groups`);
- overlong shaping: `rl.overlong_buffer` — a soft penalty over the last
  L_cache tokens of the length budget (`overlong_penalty`), and
  `rl.overlong_filter` — truncated samples leave the loss.

These are host-side functions of a rollout's rewards and lengths; the
on-policy learner (experiments/on_policy.py) calls them between sampling and
scoring.
"""

from __future__ import annotations

import numpy as np


def informative_groups(rewards: np.ndarray, num_samples: int) -> np.ndarray:
    """[G] bool: the groups (rows prompt-major, K per group) whose rewards are not all equal."""
    groups = np.asarray(rewards, np.float64).reshape(-1, num_samples)
    return groups.max(axis=1) != groups.min(axis=1)


def full_batch_groups(informative: np.ndarray, wanted: int) -> np.ndarray:
    """The groups of a full batch of `wanted`, in the order drawn: the first `wanted`
    informative groups; when fewer were drawn (the refill cap reached), the earliest
    uninformative groups fill the rest, so the update's shape never changes (their
    group advantage is 0: they add no gradient, only tokens to the denominators)."""
    informative = np.asarray(informative, bool)
    if informative.size < wanted:
        raise ValueError(f"{informative.size} groups drawn, fewer than the batch's {wanted}.")
    order = np.concatenate([np.flatnonzero(informative), np.flatnonzero(~informative)])
    return np.sort(order[:wanted])


def overlong_penalty(
    lengths: np.ndarray, max_new_tokens: int, buffer: int, factor: float = 1.0
) -> np.ndarray:
    """DAPO's soft overlong punishment, per completion: 0 up to max_new_tokens - buffer
    tokens, then falling linearly to -factor at the budget (and below it past the budget,
    which a sampler that stops at the budget never reaches).

    The sampler cuts at max_new_tokens, so L_max is the budget and the expected
    length L_max - L_cache; a cut answer is rarely correct, and the ramp tells the
    policy so before the cut (the paper: L_cache 4096 of 20480).
    """
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(
            f"overlong buffer {buffer} must be in (0, max_new_tokens={max_new_tokens}]."
        )
    over = np.maximum(np.asarray(lengths, np.float64) - (max_new_tokens - buffer), 0.0)
    return (-factor * over / buffer).astype(np.float32)

"""From character-offset rewards to the per-token reward array PPO needs.

Rewards are computed on decoded text and paid at character offsets (the end
of the text they judge). The token that pays a reward at offset ``c`` is the
last token starting before ``c``: the one whose generation completes
``text[:c]``. Token starts come from a fast tokenizer's offset mapping.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import transformers


def token_starts(
    tokenizer: transformers.PreTrainedTokenizerBase, texts: Sequence[str]
) -> list[list[int]]:
    """The character offset where each token of each text begins (no special tokens)."""
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return [[start for start, _ in mapping] for mapping in encoded["offset_mapping"]]


def char_to_token_positions(starts: Sequence[int], char_offsets: Sequence[int]) -> list[int]:
    """The index of the token that completes ``text[:c]`` for each offset ``c`` (0 for ``c <= 0``)."""
    return [max(bisect.bisect_left(starts, c) - 1, 0) for c in char_offsets]


def token_rewards(
    dense: Sequence[Sequence[tuple[int, float]]], starts: Sequence[Sequence[int]], length: int
) -> np.ndarray:
    """A float32 ``[len(dense), length]`` array with each reward added at its token.

    Rewards for text beyond ``length`` tokens (a truncated completion) are paid
    at the last position, so no reward is lost.
    """
    out = np.zeros((len(dense), length), np.float32)
    for row, (pairs, row_starts) in enumerate(zip(dense, starts, strict=True)):
        positions = char_to_token_positions(row_starts, [offset for offset, _ in pairs])
        for position, (_, reward) in zip(positions, pairs):
            out[row, min(position, length - 1)] += reward
    return out

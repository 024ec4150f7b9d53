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


def sampled_token_ends(
    tokenizer: transformers.PreTrainedTokenizerBase, ids: Sequence[int], text: str
) -> np.ndarray:
    """For each SAMPLED token, the length of the completion's text once it is decoded.

    Re-tokenising the decoded text can split it differently from the ids the
    policy sampled (byte-level BPE has many spellings of one string), and a
    reward must land on a token the policy chose. So every prefix of the
    sampled ids is decoded as the sampler decodes the whole (special tokens
    skipped), clipped to `text` (the completion as the rewards saw it, stop
    text removed) and made non-decreasing (a partial UTF-8 character decodes
    to a placeholder).
    """
    if not len(ids):
        return np.zeros((0,), np.int64)
    prefixes = tokenizer.batch_decode(
        [list(ids[: i + 1]) for i in range(len(ids))], skip_special_tokens=True
    )
    ends = np.minimum([len(p) for p in prefixes], len(text))
    return np.maximum.accumulate(ends)


def sampled_token_rewards(
    tokenizer: transformers.PreTrainedTokenizerBase,
    dense: Sequence[Sequence[tuple[int, float]]],
    texts: Sequence[str],
    completion_tokens: np.ndarray,
    lengths: np.ndarray,
) -> np.ndarray:
    """float32 [N, G]: each (offset, reward) paid at the sampled token that completes
    text[:offset]; rewards at or past the text's end (sparse rewards, and
    text cut by a stop string) at the completion's last token, its EOS or
    stop token (or its last token when the length budget cut it)."""
    n, g = completion_tokens.shape
    out = np.zeros((n, g), np.float32)
    for row, (pairs, text, length) in enumerate(zip(dense, texts, lengths, strict=True)):
        last = max(int(length) - 1, 0)
        inside = [(offset, r) for offset, r in pairs if offset < len(text)]
        for offset, r in pairs:
            if offset >= len(text):
                out[row, last] += r
        if inside:
            ends = sampled_token_ends(tokenizer, completion_tokens[row, :length].tolist(), text)
            for offset, r in inside:
                position = int(np.searchsorted(ends, max(offset, 1), side="left"))
                out[row, min(position, last)] += r
    return out

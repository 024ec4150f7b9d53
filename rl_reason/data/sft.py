"""Prompt/completion pairs to fixed-shape training arrays.

Training batches are right-padded to one static length (one compile); the
loss covers the completion tokens (and the EOS that ends them), not the
prompt. Positions are derived from input_mask by the model, so left- and
right-padded rows score identically.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def encode_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt (with BOS when the tokenizer has one) and completion + EOS."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def encode_pairs(
    tokenizer, prompts: Sequence[str], completions: Sequence[str]
) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_pair` of every (prompt, completion), each list encoded in one call."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
    if not prompts:
        return []
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [(bos + p, c + eos) for p, c in zip(prompt_ids, completion_ids)]


def pad_id(tokenizer) -> int:
    """The id padding is filled with: the tokenizer's pad token, else 0 (Llama has
    none; padded positions are masked out of attention and loss, so any id does)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pack_pairs(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, pad_id: int
) -> tuple[dict[str, np.ndarray], int]:
    """Right-padded {tokens, input_mask, loss_mask} [len(pairs), max_length], and
    the number of rows cut at max_length (the completion's end goes first), so
    that a run can report it.
    """
    n = len(pairs)
    tokens = np.full((n, max_length), pad_id, np.int32)
    input_mask = np.zeros((n, max_length), bool)
    loss_mask = np.zeros((n, max_length), bool)
    truncated = 0
    for row, (prompt, completion) in enumerate(pairs):
        ids = list(prompt) + list(completion)
        truncated += len(ids) > max_length
        ids = ids[:max_length]
        tokens[row, : len(ids)] = ids
        input_mask[row, : len(ids)] = True
        loss_mask[row, len(prompt) : len(ids)] = True
    return {"tokens": tokens, "input_mask": input_mask, "loss_mask": loss_mask}, truncated

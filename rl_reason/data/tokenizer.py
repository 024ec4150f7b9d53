"""A small byte-level BPE tokenizer trained on the task's own text.

Used for the synthetic task, where no pretrained tokenizer applies. Digits are
split one per token so arithmetic is learnable digit by digit, the byte-level
alphabet makes every string encodable and decoding exact (character offsets
stay meaningful for dense rewards), and the result is a transformers fast
tokenizer so it is saved with the run and reloaded with ``AutoTokenizer``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512
) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE with ids 0, 1, 2 = pad, bos, eos.

    Encoding with ``add_special_tokens=True`` prepends bos (as Llama does); eos
    is appended by whoever builds training targets.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A $B",
                special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
            ),
        ]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )


def save_tokenizer(
    tokenizer: transformers.PreTrainedTokenizerBase, directory: str | os.PathLike
) -> None:
    """Writes the tokenizer into a run directory."""
    tokenizer.save_pretrained(os.fspath(directory))


def load_tokenizer(directory: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """Loads a tokenizer saved by :func:`save_tokenizer` (or any HF tokenizer directory)."""
    return transformers.AutoTokenizer.from_pretrained(os.fspath(directory))

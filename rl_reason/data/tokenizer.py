"""A small byte-level BPE tokenizer trained on the task's own text.

Used for the synthetic task, where no pretrained tokenizer applies. Digits are
split one per token so arithmetic is learnable digit by digit, the byte-level
alphabet makes every string encodable and decoding exact (character offsets
stay meaningful for dense rewards), and the result is a transformers fast
tokenizer so it is saved with the run and reloaded with ``AutoTokenizer``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable

import transformers
from absl import logging
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from rl_reason.files import fsync_path

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
# A Hugging Face tokenizer directory holds its vocabulary in one of these.
VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tiktoken.model",
)


class IncompleteTokenizerError(ValueError):
    """A tokenizer directory that is empty, partly written or corrupt."""


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
    """Writes the tokenizer into a run directory, atomically.

    The files are written and synced in a temporary directory next to
    `directory`, which is then renamed into place, so `directory` either does
    not exist or holds a complete tokenizer, whenever the process dies. A
    `directory` that already holds a tokenizer is kept as it is (a run's
    checkpoints were trained with it; a warning says so when it differs from
    `tokenizer`); one that exists without a vocabulary (left by an earlier,
    non-atomic save) is moved aside to `<directory>.incomplete-<time>`, never deleted.
    """
    directory = os.path.abspath(os.fspath(directory))
    if _holds_vocabulary(directory):
        logging.info("Keeping the tokenizer already in %s.", directory)
        return
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        tokenizer.save_pretrained(staging)
        _sync_directory_tree(staging)
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would hide it from other users
        _move_into_place(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed


def _move_into_place(staging: str, directory: str) -> None:
    try:
        os.rename(staging, directory)  # replaces a missing or empty directory atomically
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if _holds_vocabulary(directory):  # written meanwhile, e.g. by another process
            if not _same_files(staging, directory):
                logging.warning(
                    "Kept the tokenizer in %s, which differs from the one being saved.", directory
                )
            return
        aside = f"{directory}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        logging.warning(
            "%s held no complete tokenizer (%s); moved it to %s.",
            directory,
            ", ".join(sorted(os.listdir(directory))),
            aside,
        )
        os.rename(directory, aside)
        os.rename(staging, directory)
    fsync_path(os.path.dirname(directory))


def load_tokenizer(directory: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """Loads a tokenizer saved by :func:`save_tokenizer` (or any HF tokenizer directory).

    An empty, partly written or corrupt directory raises IncompleteTokenizerError
    naming it and what is missing.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No tokenizer directory at {directory}.")
    if not _holds_vocabulary(directory):
        files = sorted(os.listdir(directory))
        raise IncompleteTokenizerError(
            f"The tokenizer directory {directory} is incomplete: it holds"
            f" {', '.join(files) if files else 'no files'} but no vocabulary"
            f" ({' or '.join(VOCAB_FILES[:2])}); an earlier save was probably interrupted."
            " Delete the directory to have the tokenizer saved again."
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except Exception:
        problem = _corrupt_json(directory)
        if problem is None:
            raise
    raise IncompleteTokenizerError(
        f"The tokenizer directory {directory} is incomplete or corrupt: {problem}."
        " Delete the directory to have the tokenizer saved again."
    )


def _holds_vocabulary(directory: str) -> bool:
    return os.path.isdir(directory) and any(
        os.path.isfile(os.path.join(directory, name)) for name in VOCAB_FILES
    )


def _corrupt_json(directory: str) -> str | None:
    """The first JSON file in `directory` that does not parse (e.g. cut short), described."""
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    json.loads(f.read().decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                return f"{name} is not valid JSON ({e})"
    return None


def _same_files(a: str, b: str) -> bool:
    def read(directory, name):
        try:
            with open(os.path.join(directory, name), "rb") as f:
                return f.read()
        except OSError:
            return None

    return all(read(a, name) == read(b, name) for name in os.listdir(a))


def _umask() -> int:
    try:  # Linux says it without changing it (another thread may be creating files)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(umask)
    return umask


def _sync_directory_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)

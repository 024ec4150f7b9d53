"""TFDS builders for GSM8K, SVAMP and the synthetic task, read without TensorFlow.

Each is prepared once into array_record files under ``data_dir`` and read
back through ``tfds.data_source``: random access by index, which is what the
resumable batch iterator needs, in the source's order (no shuffling at
preparation; the iterator shuffles). GSM8K and SVAMP read the real files from a
manual directory (see ``sources``); nothing is downloaded. The builders are
registered under ``rl_reason_*`` names because TFDS ships its own ``gsm8k``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import ClassVar

import tensorflow_datasets as tfds

from rl_reason.data import sources, synthetic

_TEXT = tfds.features.Text()
_COLUMNS = ("question", "answer", "final_answer")
_SVAMP_COLUMNS = (*_COLUMNS, "id", "official_answer", "equation", "type")


def _features(columns: Iterable[str]) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({name: _TEXT for name in columns})


class RlReasonGsm8k(tfds.core.GeneratorBasedBuilder):
    """GSM8K (Cobbe et al., 2021): 7473 train and 1319 test grade-school math problems."""

    name = "rl_reason_gsm8k"
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = sources.MANUAL_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=_features(_COLUMNS),
            homepage="https://github.com/openai/grade-school-math",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {
            split: self._generate_examples(sources.read_gsm8k(dl_manager.manual_dir, split))
            for split in ("train", "test")
        }

    def _generate_examples(self, rows: list[dict[str, str]]):
        for index, row in enumerate(rows):
            yield index, {name: row[name] for name in _COLUMNS}


class RlReasonSvamp(tfds.core.GeneratorBasedBuilder):
    """SVAMP (Patel et al., 2021): 1000 one- or two-step problems, a single ``test`` split."""

    name = "rl_reason_svamp"
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = sources.MANUAL_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=_features(_SVAMP_COLUMNS),
            homepage="https://github.com/arkilpatel/SVAMP",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(sources.read_svamp(dl_manager.manual_dir))}

    def _generate_examples(self, rows: list[dict[str, str]]):
        for index, row in enumerate(rows):
            yield index, {name: row[name] for name in _SVAMP_COLUMNS}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """How many synthetic problems of which difficulty; give each variant its own ``name``."""

    num_train: int = 20_000
    num_test: int = 1_000
    seed: int = 0
    difficulty: synthetic.Difficulty = dataclasses.field(default_factory=synthetic.Difficulty)


class RlReasonSynthetic(tfds.core.GeneratorBasedBuilder):
    """Procedural arithmetic word problems (see ``synthetic``), train and test."""

    name = "rl_reason_synthetic"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS: ClassVar[list[SyntheticConfig]] = [SyntheticConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=_features(_COLUMNS), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to read
        config = self.builder_config
        sizes = {"train": config.num_train, "test": config.num_test}
        return {
            split: self._generate_examples(
                synthetic.generate(split, size, seed=config.seed, difficulty=config.difficulty)
            )
            for split, size in sizes.items()
        }

    def _generate_examples(self, rows: list[dict[str, str]]):
        yield from enumerate(rows)


BUILDERS = {"gsm8k": RlReasonGsm8k, "svamp": RlReasonSvamp, "synthetic": RlReasonSynthetic}


def data_source(
    dataset: str,
    split: str,
    *,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    config: tfds.core.BuilderConfig | None = None,
) -> tfds.data_sources.ArrayRecordDataSource:
    """Random-access rows of ``dataset`` ("gsm8k", "svamp", "synthetic"), prepared on first use.

    ``manual_dir`` holds the real files (default: :func:`sources.locate_data_dir`).
    Rows are dicts of ``bytes``; :func:`decode` turns one into ``str`` columns.
    """
    if dataset not in BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(BUILDERS)}")
    manual_dir = manual_dir or sources.locate_data_dir()
    builder_kwargs = {"file_format": "array_record"}
    if config is not None:
        builder_kwargs["config"] = config
    return tfds.data_source(
        BUILDERS[dataset].name,
        split=split,
        data_dir=os.fspath(data_dir),
        builder_kwargs=builder_kwargs,
        download_and_prepare_kwargs={
            "download_config": tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir) if manual_dir else None
            )
        },
    )


def decode(row: Mapping[str, bytes]) -> dict[str, str]:
    """A data-source row with its text columns as ``str``."""
    return {name: value.decode("utf-8") for name, value in row.items()}

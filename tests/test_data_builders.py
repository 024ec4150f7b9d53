"""TFDS builders: array_record files read back through tfds.data_source, deterministically."""

import pytest
import tensorflow_datasets as tfds

from rl_reason.data import builders, sources, synthetic

tfds.disable_progress_bar()
DATA_DIR = sources.locate_data_dir()
needs_data = pytest.mark.skipif(
    DATA_DIR is None,
    reason=f"real data not found: set ${sources.DATA_DIR_ENV} or put it in ../shared/data",
)
SMALL = builders.SyntheticConfig(
    name="small", num_train=200, num_test=50, seed=5, difficulty=synthetic.Difficulty(1, 3, 12)
)


def _rows(source):
    return [builders.decode(source[i]) for i in range(len(source))]


def test_synthetic_builds_the_same_rows_twice_in_generator_order(tmp_path):
    first = _rows(builders.data_source("synthetic", "train", data_dir=tmp_path / "a", config=SMALL))
    again = _rows(builders.data_source("synthetic", "train", data_dir=tmp_path / "b", config=SMALL))
    assert first == again == synthetic.generate("train", 200, seed=5, difficulty=SMALL.difficulty)
    test = builders.data_source("synthetic", "test", data_dir=tmp_path / "a", config=SMALL)
    assert len(test) == 50
    assert not {row["question"] for row in first} & {row["question"] for row in _rows(test)}


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        builders.data_source("mawps", "test", data_dir="unused")


def test_missing_manual_dir_says_what_to_put_where(tmp_path):
    with pytest.raises(AssertionError) as error:
        builders.data_source("svamp", "test", data_dir=tmp_path, manual_dir=tmp_path / "absent")
    assert "svamp.json" in str(error.value) and "github.com/arkilpatel/SVAMP" in str(error.value)


@needs_data
def test_real_builders_keep_the_files_rows_and_order(tmp_path):
    svamp = builders.data_source("svamp", "test", data_dir=tmp_path, manual_dir=DATA_DIR)
    assert _rows(svamp) == sources.read_svamp(DATA_DIR)
    gsm8k = builders.data_source("gsm8k", "test", data_dir=tmp_path, manual_dir=DATA_DIR)
    assert _rows(gsm8k) == sources.read_gsm8k(DATA_DIR, "test")
    train = builders.data_source("gsm8k", "train", data_dir=tmp_path)  # prepared already
    assert len(train) == 7473
    assert builders.decode(train[0])["final_answer"] == "72"

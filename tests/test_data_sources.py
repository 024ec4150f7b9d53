"""Reading the real files: counts, known rows, SVAMP solutions, clear errors."""

from fractions import Fraction

import pytest

from rl_reason.data import sources
from rl_reason.rewards import calculator
from rl_reason.rewards.extraction import extract_answer

DATA_DIR = sources.locate_data_dir()
needs_data = pytest.mark.skipif(
    DATA_DIR is None,
    reason=f"real data not found: set ${sources.DATA_DIR_ENV} or put it in ../shared/data",
)


@pytest.mark.parametrize(
    "equation, solution, value",
    [
        ("( 76.0 - 25.0 )", "76-25 = <<76-25=51>>51\n#### 51", 51),
        ("( ( 4.0 - 8.0 ) + 5.0 )", "4-8 = <<4-8=-4>>-4\n(-4)+5 = <<(-4)+5=1>>1\n#### 1", 1),
        (
            "( 60.0 * ( 55.0 / 15.0 ) )",
            "55/15 = <<55/15=11/3>>11/3\n60*(11/3) = <<60*(11/3)=220>>220\n#### 220",
            220,
        ),
        (
            "( 28.0 * ( 24.0 / 16.0 ) )",
            "24/16 = <<24/16=1.5>>1.5\n28*1.5 = <<28*1.5=42>>42\n#### 42",
            42,
        ),
        ("8.0", "#### 8", 8),
    ],
)
def test_equation_solution(equation, solution, value):
    assert sources.equation_solution(equation) == (solution, Fraction(value))
    assert all(calculator.is_consistent(note) for note in calculator.find_notes(solution))


def test_gsm8k_final_answer_removes_commas():
    assert sources.gsm8k_final_answer("a\nb\n#### 1,080") == "1080"
    assert sources.gsm8k_final_answer("#### -3") == "-3"


@pytest.mark.parametrize("reader", [lambda d: sources.read_gsm8k(d, "test"), sources.read_svamp])
def test_missing_files_name_themselves_and_their_source(tmp_path, reader):
    with pytest.raises(sources.MissingDataError) as error:
        reader(tmp_path)
    message = str(error.value)
    for name, source in sources.SOURCES.items():
        assert name in message and source in message
    assert sources.DATA_DIR_ENV in message
    with pytest.raises(sources.MissingDataError):
        reader(None)


def test_locate_data_dir_prefers_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    assert sources.locate_data_dir() == tmp_path


@needs_data
def test_gsm8k_rows():
    test = sources.read_gsm8k(DATA_DIR, "test")
    assert len(test) == 1319
    assert test[0]["question"].startswith("Janet’s ducks lay 16 eggs")
    assert set(test[0]) == {"question", "answer", "final_answer"}
    negatives = [row["final_answer"] for row in test if row["final_answer"].startswith("-")]
    assert len(negatives) == 2


@needs_data
def test_svamp_rows():
    rows = sources.read_svamp(DATA_DIR)
    assert [row["id"] for row in rows[:2]] == ["chal-1", "chal-2"]
    first = rows[0]
    assert first["question"] == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?"
    )
    assert first["answer"] == "76-25 = <<76-25=51>>51\n#### 51"
    fixed = next(row for row in rows if row["id"] == "chal-680")
    assert (fixed["official_answer"], fixed["final_answer"]) == ("1", "5")
    assert extract_answer(fixed["answer"]) == "5"

"""RCRL raises held-out maj@1 above its SFT start and answers better under its good token.

The start is `configs/arith_two_styles_start.py` as shipped: half its SFT
solutions are bare final lines, so the model learns two ways to answer (work
it out, or write the number at once) and its good and bad samples differ in a
choice a return token can name. The shipped `configs/arith_rcrl.py` then runs
from it and, on the same 256 held-out questions, must end a clear margin above
the start's greedy maj@1 (conditioned on `<|good|>`) and answer better under
`<|good|>` than under `<|bad|>` after every round. The figures are in the
README's "Results on the synthetic task".

The `results` tier (with `test_rl_margins.py`): `python -m pytest -m results`.
"""

import pytest
from margins import HELDOUT, MARGIN, heldout_records, quiet, train_start

from configs import arith_rcrl, arith_two_styles_start
from rl_reason.experiments import registry

pytestmark = pytest.mark.results


@pytest.fixture(scope="module")
def two_styles_start(tmp_path_factory):
    return train_start(tmp_path_factory, arith_two_styles_start.get_config(), "sft_two_styles")


@pytest.mark.slow
def test_rcrl_raises_heldout_maj1_and_answers_better_under_its_good_token(
    two_styles_start, tmp_path
):
    config = quiet(arith_rcrl.get_config())
    config.model_source.path = str(two_styles_start)
    assert config.eval.num_examples == HELDOUT
    registry.trainer(config)(config, str(tmp_path))
    records = heldout_records(tmp_path)
    start, rounds = records[0]["heldout/maj@1"], records[1:]
    good = [r["heldout/maj@1"] for r in rounds]
    bad = [r["heldout/bad_token_maj@1"] for r in rounds]
    print(f"rcrl: held-out maj@1 {start:.3f} -> <|good|> {good}, <|bad|> {bad}")
    assert records[0]["samples_drawn"] == 0 and len(rounds) == config.rcrl.num_rounds
    assert good[-1] >= start + MARGIN, (start, good)
    assert all(g > b for g, b in zip(good, bad)), (good, bad)
    assert sum(good) - sum(bad) >= MARGIN * len(rounds), (good, bad)

"""RL raises held-out maj@1 above a clearly imperfect SFT start: the shipped configs, end to end.

The start is `configs/arith_start.py` as shipped (a mid-schedule SFT
checkpoint: greedy held-out maj@1 about 65%, pass@8 about 78%). Each
algorithm then runs its shipped config, `configs/arith_*.py`, from that
start, and must end a clear margin above the start's maj@1 on the same 256
held-out questions, which the run itself measures before its first update
(`eval.at_start`). The outcome reward model trained on that start's samples
(`configs/arith_orm.py`) must tell its right answers from its wrong ones and
rerank them at least as well as majority voting does. RCRL runs from its own
start, `configs/arith_two_styles_start.py` (samples that differ in the way
they answer, not only by slips), and must answer better under its
good-return token than under its bad one. The figures are in the
README's "Results on the synthetic task"; these tests keep them true.

They are the `results` tier: seven runs of the shipped configs, about 45
minutes on a 2-core CPU, about as long as the rest of the suite together, so
`python -m pytest` leaves them out (pyproject's addopts) and
`python -m pytest -m results` runs them.
"""

import json
import os
import sys

import pytest

from rl_reason.experiments import registry, sft

pytestmark = pytest.mark.results

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import (  # noqa: E402
    arith_ei,
    arith_grpo,
    arith_orm,
    arith_ppo,
    arith_rcrl,
    arith_start,
    arith_two_styles_start,
)

HELDOUT = 256
# One question is 0.4 points; the runs measured gain 8-17 points (README), and a
# start-to-end difference of 5 points on 256 questions is about 2.5 standard errors.
MARGIN = 0.05


def _quiet(config):
    config.logging.update(progress_bar=False, tensorboard=False)
    return config


@pytest.fixture(scope="module")
def imperfect_start(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft_start")
    sft.train(_quiet(arith_start.get_config()), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def two_styles_start(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft_two_styles")
    sft.train(_quiet(arith_two_styles_start.get_config()), str(workdir))
    return workdir


def _heldout_records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "heldout/maj@1" in r]


def _heldout_curve(workdir):
    return [(r["samples_drawn"], r["heldout/maj@1"]) for r in _heldout_records(workdir)]


@pytest.mark.slow
@pytest.mark.parametrize("module", [arith_grpo, arith_ppo, arith_ei], ids=["grpo", "ppo", "ei"])
def test_rl_raises_heldout_maj1_above_the_sft_start(imperfect_start, tmp_path, module):
    config = _quiet(module.get_config())
    config.model_source.path = str(imperfect_start)
    assert config.eval.at_start and config.eval.num_examples == HELDOUT
    registry.trainer(config)(config, str(tmp_path))
    curve = _heldout_curve(tmp_path)
    (drawn_at_start, start), (drawn, end) = curve[0], curve[-1]
    assert drawn_at_start == 0 and drawn > 0
    print(f"{config.algorithm}: held-out maj@1 {start:.3f} -> {end:.3f} ({curve})")
    assert end >= start + MARGIN, curve


@pytest.mark.slow
def test_the_orm_separates_right_from_wrong_and_reranks_at_least_as_well_as_voting(
    imperfect_start, tmp_path
):
    """The shipped ORM config on the same start's samples: held-out AUC at least 0.8, and
    rerank@4 at least maj@4 on the same K=4 samples of its 1,024 held-out questions,
    for the ORM its validation questions chose."""
    config = _quiet(arith_orm.get_config())
    config.model_source.path = str(imperfect_start)
    registry.trainer(config)(config, str(tmp_path))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        selected = [json.loads(line) for line in f][-1]
    figures = {k[len("selected/heldout/") :]: v for k, v in selected.items() if "selected/" in k}
    print(f"orm: step {selected['selected_step']}, held-out {figures}")
    assert figures["auc"] >= 0.8, figures
    assert figures["rerank@4"] >= figures["maj@4"], figures


@pytest.mark.slow
def test_rcrl_answers_better_under_its_good_token_than_under_its_bad_one(
    two_styles_start, tmp_path
):
    """The shipped RCRL config from the two-styles start: after every round, held-out
    greedy maj@1 under <|good|> is above maj@1 under <|bad|> on the same questions, by
    a clear margin on average. The gain over the start is printed, not asserted: it
    was +9.0 to +11.3 points over three seeds from the start trained on one device,
    but +1.2 for this run from the one trained on this suite's eight (+8.6 for seed
    1): the start, not the mesh, makes the difference (README)."""
    config = _quiet(arith_rcrl.get_config())
    config.model_source.path = str(two_styles_start)
    assert config.eval.num_examples == HELDOUT
    registry.trainer(config)(config, str(tmp_path))
    records = _heldout_records(tmp_path)
    start, rounds = records[0]["heldout/maj@1"], records[1:]
    good = [r["heldout/maj@1"] for r in rounds]
    bad = [r["heldout/bad_token_maj@1"] for r in rounds]
    print(f"rcrl: held-out maj@1 {start:.3f} -> <|good|> {good}, <|bad|> {bad}")
    assert records[0]["samples_drawn"] == 0 and len(rounds) == config.rcrl.num_rounds
    assert all(g > b for g, b in zip(good, bad)), (good, bad)
    assert sum(good) - sum(bad) >= MARGIN * len(rounds), (good, bad)

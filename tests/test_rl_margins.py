"""RL raises held-out maj@1 above a clearly imperfect SFT start: the shipped configs, end to end.

The start is `configs/arith_start.py` as shipped (a mid-schedule SFT
checkpoint: greedy held-out maj@1 about 65%, pass@8 about 78%). Each
algorithm then runs its shipped config, `configs/arith_*.py`, from that
start, and must end a clear margin above the start's maj@1 on the same 256
held-out questions, which the run itself measures before its first update
(`eval.at_start`). The outcome reward model trained on that start's samples
(`configs/arith_orm.py`) must tell its right answers from its wrong ones and
rerank them at least as well as majority voting does. RCRL, which needs a
start of its own, is `test_rcrl_margins.py`. The figures are in the README's
"Results on the synthetic task"; these tests keep them true.

They are the `results` tier: ten runs of the shipped configs in two modules
(DAPO and GSPO, issue 30's objectives, and GRPO with LoRA adapters among them),
about an hour of a 2-core CPU, so `python -m pytest` leaves them out
(pyproject's addopts) and `python -m pytest -m results` runs them.
"""

import json
import os

import pytest
from margins import HELDOUT, MARGIN, heldout_records, quiet, train_start

from configs import (
    arith_dapo,
    arith_ei,
    arith_grpo,
    arith_grpo_lora,
    arith_gspo,
    arith_orm,
    arith_ppo,
    arith_start,
)
from rl_reason.experiments import registry

pytestmark = pytest.mark.results


@pytest.fixture(scope="module")
def imperfect_start(tmp_path_factory):
    return train_start(tmp_path_factory, arith_start.get_config(), "sft_start")


def _heldout_curve(workdir):
    return [(r["samples_drawn"], r["heldout/maj@1"]) for r in heldout_records(workdir)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "module",
    [arith_grpo, arith_ppo, arith_ei, arith_dapo, arith_gspo, arith_grpo_lora],
    ids=["grpo", "ppo", "ei", "dapo", "gspo", "grpo_lora"],
)
def test_rl_raises_heldout_maj1_above_the_sft_start(imperfect_start, tmp_path, module):
    config = quiet(module.get_config())
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
    config = quiet(arith_orm.get_config())
    config.model_source.path = str(imperfect_start)
    registry.trainer(config)(config, str(tmp_path))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        selected = [json.loads(line) for line in f][-1]
    figures = {k[len("selected/heldout/") :]: v for k, v in selected.items() if "selected/" in k}
    print(f"orm: step {selected['selected_step']}, held-out {figures}")
    assert figures["auc"] >= 0.8, figures
    assert figures["rerank@4"] >= figures["maj@4"], figures

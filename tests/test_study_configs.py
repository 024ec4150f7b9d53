"""The study-scale configs are valid and fit their accelerators, planned without allocating."""

import os
import sys

import pytest

from rl_reason.experiments import config as config_lib
from rl_reason.experiments import plan

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import study_gsm8k_ei, study_gsm8k_ppo, study_gsm8k_sft  # noqa: E402

GIB = 2**30
# (mesh, devices, accelerator memory): a TPU v4-64 slice (32 chips of 32 GiB)
# and one box of 8 A100s (80 GB). Leave at least 40% for activations.
TARGETS = [((1, 32, 1), 32, 32 * GIB), ((1, 8, 1), 8, 80e9)]


@pytest.mark.parametrize("mesh_shape, devices, memory", TARGETS, ids=["tpu_v4_64", "8_gpus"])
@pytest.mark.parametrize(
    "module", [study_gsm8k_ppo, study_gsm8k_ei, study_gsm8k_sft], ids=["ppo", "ei", "sft"]
)
def test_study_config_fits(module, mesh_shape, devices, memory):
    config = module.get_config()
    config.mesh.shape = mesh_shape
    if "rl" in config:
        config_lib.validate_rl(config, num_devices=devices)
    if config.algorithm == "sft":
        config_lib.validate(config, num_devices=devices)
    budget = plan.plan_for_config(config, plan.abstract_mesh(mesh_shape))
    assert budget["params"] > 6.5e9 * 4 / devices * 0.95  # every parameter is counted, in float32
    assert budget["total"] < 0.6 * memory, {k: v / GIB for k, v in budget.items()}


def test_a_replicated_7b_policy_does_not_fit_one_gpu_and_the_plan_says_so():
    config = study_gsm8k_ppo.get_config()
    config.mesh.shape = (8, 1, 1)  # pure data parallel: every device holds everything
    budget = plan.plan_for_config(config, plan.abstract_mesh((8, 1, 1)))
    assert budget["total"] > 80e9


def test_the_study_sft_holds_out_the_questions_ei_validates_on():
    sft, ei = study_gsm8k_sft.get_config(), study_gsm8k_ei.get_config()
    assert (sft.data.task, sft.data.num_validation) == (ei.data.task, ei.data.num_validation)
    assert sft.model.to_dict() == ei.model.to_dict()

"""Config keys that moved to the `sampling` and `train` sections still work, for one release."""

import logging

import pytest

from rl_reason.experiments import config as config_lib


@pytest.mark.parametrize(
    "make, section",
    [
        (config_lib.ei_config, "ei"),
        (config_lib.rcrl_config, "rcrl"),
        (config_lib.orm_config, "orm"),
    ],
)
def test_a_rounds_section_s_old_sampling_keys_move_with_a_warning(make, section, caplog):
    config = make()
    config[section].update(
        sampling_batch_size=8, sampling_chunk=32, prompt_buckets=(128,), samples_per_call=2
    )
    with caplog.at_level(logging.WARNING):
        config_lib.resolve_moved_keys(config)
    s = config.sampling
    assert (s.batch_size, s.chunk, tuple(s.prompt_buckets), s.samples_per_call) == (
        8,
        32,
        (128,),
        2,
    )
    assert f"{section}.sampling_batch_size is deprecated: set sampling.batch_size" in caplog.text
    config_lib.resolve_moved_keys(config)  # the old keys are unset now: nothing moves again
    assert config.sampling.batch_size == 8


def test_rl_and_eval_keys_move_and_unset_ones_change_nothing(caplog):
    config = config_lib.rl_config()
    config.rl.update(sampling_batch_size=8, remat="full")
    config_lib.resolve_moved_keys(config)
    assert (config.sampling.batch_size, config.train.remat) == (8, "full")
    evaluation = config_lib.eval_config()
    evaluation.eval.update(batch_size=16, chunk_size=64)
    config_lib.resolve_moved_keys(evaluation)
    assert (evaluation.sampling.batch_size, evaluation.sampling.chunk) == (16, 64)
    untouched = config_lib.ei_config()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config_lib.resolve_moved_keys(untouched)
    assert untouched.to_dict() == config_lib.ei_config().to_dict() and not caplog.text

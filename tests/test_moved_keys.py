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
    config.rl.update(sampling_batch_size=8, remat="full", shared_prompt_scoring=False)
    config_lib.resolve_moved_keys(config)
    assert (config.sampling.batch_size, config.train.remat) == (8, "full")
    assert config.rl.shared_prompts is False and config.rl.shared_prompt_scoring is None
    evaluation = config_lib.eval_config()
    evaluation.eval.update(batch_size=16, chunk_size=64)
    config_lib.resolve_moved_keys(evaluation)
    assert (evaluation.sampling.batch_size, evaluation.sampling.chunk) == (16, 64)
    untouched = config_lib.ei_config()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config_lib.resolve_moved_keys(untouched)
    assert untouched.to_dict() == config_lib.ei_config().to_dict() and not caplog.text


def test_a_run_begun_under_the_old_keys_compares_with_today_s_config(tmp_path):
    """A config.json written before the keys moved reads as today's: the resume check
    sees the same sampling settings (and would see a changed one)."""
    import json

    from rl_reason.experiments import runs

    old = config_lib.orm_config()
    saved = runs.config_dict(old)
    saved["orm"].update(sampling_batch_size=8, sampling_chunk=16)  # as an old run wrote it
    for key in ("sampling",):
        del saved[key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    today = config_lib.orm_config()
    today.sampling.update(batch_size=8, chunk=16)
    runs.check_resume_config(today, str(tmp_path), ("orm", "sampling"))
    today.sampling.chunk = 32
    with pytest.raises(runs.ResumeConfigError, match="sampling.chunk: 16 in the run, 32 now"):
        runs.check_resume_config(today, str(tmp_path), ("orm", "sampling"))

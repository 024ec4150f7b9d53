"""Evaluation runs end to end: a trained run's checkpoint, real GSM8K/SVAMP prompts, the report."""

import json

import pytest

from rl_reason.data import sources
from rl_reason.experiments import config as config_lib
from rl_reason.experiments import evaluate, sft
from rl_reason.sampling.engine import Sampler


def _tiny_run(workdir):
    config = config_lib.base_config()
    config.model.update(hidden_dim=32, num_layers=2, head_dim=8, mlp_dim=64, vocab_size=0)
    config.data.update(num_train=64, num_eval=16, tokenizer_vocab_size=300)
    config.train.update(batch_size=16, max_length=96, num_steps=3, log_every=1, eval_every=3)
    config.logging.update(progress_bar=False, tensorboard=False)
    sft.train(config, str(workdir))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    _tiny_run(workdir)
    return workdir


def _eval_config(run_dir, **changes):
    config = config_lib.eval_config()
    config.model_source.path = str(run_dir)
    config.logging.progress_bar = False
    config.eval.update(
        num_examples=10, num_samples=3, max_new_tokens=12, batch_size=8, prompt_buckets=(64,)
    )
    config.eval.update(changes)
    return config


def test_evaluate_a_training_run(tiny_run, tmp_path):
    metrics = evaluate.run(_eval_config(tiny_run), str(tmp_path / "eval"))
    assert metrics["num_questions"] == 10
    for name in ("maj@1", "maj@3", "pass@1", "pass@3", "distinct_answers"):
        assert name in metrics
    assert metrics["pass@3"] >= metrics["pass@1"]
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "eval_samples.jsonl")]
    assert len(rows) == 10 and all(len(r["samples"]) == 3 for r in rows)
    assert "maj@1" in (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.skipif(sources.locate_data_dir() is None, reason="real GSM8K/SVAMP files not found")
@pytest.mark.parametrize("task, first_gold", [("gsm8k", "18"), ("svamp", None)])
def test_eval_set_reads_real_data_with_few_shot_exemplars(tmp_path, task, first_gold):
    config = config_lib.eval_config()
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.eval.update(task=task, num_examples=5, num_shots=3)
    data = evaluate.load_eval_set(config)
    assert len(data.questions) == 5 and len(data.exemplars) == 3
    assert all("####" in ex["answer"] for ex in data.exemplars)  # GSM8K-style worked solutions
    if first_gold:
        assert data.questions[0]["final_answer"] == first_gold


def test_killed_evaluation_resumes_to_the_uninterrupted_result(tiny_run, tmp_path, monkeypatch):
    """Chunked, killed and resumed gives what one uninterrupted call gives."""
    whole = evaluate.run(_eval_config(tiny_run, chunk_size=0), str(tmp_path / "whole"))
    config = _eval_config(tiny_run, chunk_size=5)  # rounded up to whole batches: 8 questions

    calls, kill_at = [], [1]
    generate = Sampler.generate

    def generate_until_killed(self, *args, **kwargs):
        if len(calls) == kill_at[0]:
            raise KeyboardInterrupt
        calls.append(kwargs["prompt_offset"])
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "generate", generate_until_killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(config, str(tmp_path / "resumed"))
    assert calls == [0]
    calls.clear()
    kill_at[0] = None
    resumed = evaluate.run(config, str(tmp_path / "resumed"))
    assert calls == [8]  # only the chunk that never finished is sampled again
    timing = ("seconds", "tokens_per_second")
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in whole.items() if k not in timing
    }
    read = lambda name: (tmp_path / name / "eval_samples.jsonl").read_text()
    assert read("resumed") == read("whole")


def test_resuming_with_another_config_is_a_clear_error(tiny_run, tmp_path):
    evaluate.run(_eval_config(tiny_run, num_examples=4, chunk_size=4), str(tmp_path / "eval"))
    with pytest.raises(ValueError, match="chunk_0000000.json.*different config"):
        evaluate.run(
            _eval_config(tiny_run, num_examples=4, chunk_size=4, temperature=1.0),
            str(tmp_path / "eval"),
        )

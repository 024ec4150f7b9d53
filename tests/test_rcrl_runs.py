"""Return-Conditioned RL end to end on a tiny model: the return tokens reach the
vocabulary, the prompts and the run's record as specified, evaluation applies
the recorded token, and an interrupted run resumes to exactly the
uninterrupted result."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from rl_reason import checkpointing
from rl_reason.algorithms import expert_iteration as ei
from rl_reason.algorithms import rcrl
from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.experiments import config as config_lib
from rl_reason.experiments import evaluate, registry, sources
from rl_reason.experiments import rcrl as rcrl_experiment
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from rl_reason.sampling.engine import Sampler

from configs import arith_rcrl

K = 2


def _rcrl_config(start, mode="sparse"):
    config = arith_rcrl.get_config()
    config.model_source.path = str(start)
    config.data.update(num_train=20, num_validation=4, num_eval=8)
    config.rcrl.update(
        mode=mode,
        num_rounds=2,
        num_samples=K,
        max_new_tokens=12,
        sampling_batch_size=8,
        sampling_chunk=8,
        steps_per_round=3,
        eval_every=2,
        prompt_buckets=(128,),
    )
    config.eval.update(num_examples=8, num_samples=K, max_new_tokens=12)
    config.train.update(batch_size=8, max_length=128, log_every=1)
    config.checkpoint.save_interval_steps = 1
    config.logging.update(progress_bar=False, tensorboard=False)
    return config


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(workdir):
    loaded = sources.load_run(str(workdir), mesh_lib.make_mesh((-1, 1, 1)), shd.DEFAULT_RULES)
    return jax.device_get(loaded.params)


def _interrupt_at(monkeypatch, steps):
    """Make the preemption guard fire after each of `steps` (the loop saves, then raises)."""
    pending = sorted(steps)
    monkeypatch.setattr(
        checkpointing.PreemptionGuard,
        "should_stop",
        lambda self, step: bool(pending) and step >= pending[0] and pending.pop(0) is not None,
    )


def _record_prompts(monkeypatch, configs=None):
    """Every Sampler.generate call's (prompts, num_samples, temperature), in order; each
    call's SamplingConfig appended to `configs` when given."""
    calls = []
    original = Sampler.generate

    def generate(self, params, prompts, rng, config, *args, **kwargs):
        calls.append((list(prompts), config.num_samples, config.temperature))
        if configs is not None:
            configs.append(config)
        return original(self, params, prompts, rng, config, *args, **kwargs)

    monkeypatch.setattr(Sampler, "generate", generate)
    return calls


def _ending(prompt):
    for token in rcrl.RETURN_TOKENS:
        if prompt.endswith("Answer:" + token):
            return token
    assert prompt.endswith("Answer:"), prompt
    return ""


def test_rcrl_is_a_registered_algorithm():
    config = arith_rcrl.get_config()
    assert registry.trainer(config) is rcrl_experiment.train
    bad = arith_rcrl.get_config()
    bad.rcrl.mode = "medium"
    bad.rcrl.step_rewards = {"nope": 1.0}
    bad.rcrl.return_token_lr_scale = 0.0
    with pytest.raises(config_lib.InvalidConfigError) as error:
        rcrl_experiment.validate_rcrl(bad)
    assert "rcrl.mode='medium'" in str(error.value) and "'nope'" in str(error.value)
    assert "return_token_lr_scale" in str(error.value)


@pytest.mark.slow
def test_rcrl_run_conditions_as_specified_and_resumes_exactly(tiny_sft_run, tmp_path, monkeypatch):
    config = _rcrl_config(tiny_sft_run)
    calls = _record_prompts(monkeypatch)
    last = rcrl_experiment.train(config, str(tmp_path / "straight"))
    monkeypatch.undo()
    assert last["round"] == 2 and last["samples_drawn"] == 2 * 20 * K
    assert {"heldout/maj@1", "heldout/pass@2", "heldout/bad_token_maj@1"} <= set(last)

    # The prompts: sampling (temperature 1, K rows) from the start model as it is in
    # round 0 and conditioned on <|good|> in round 1; held-out K+1 rows (the start
    # model unconditioned, then <|good|>); greedy validation on <|good|>, and the
    # bad-token measurement on <|bad|>.
    sampling = [{_ending(p) for p in prompts} for prompts, k, t in calls if t == 1.0]
    assert sampling == [{""}] * 3 + [{rcrl.GOOD}] * 3  # 3 chunks of 8 per round
    heldout = [{_ending(p) for p in prompts} for prompts, k, t in calls if k == K + 1]
    assert heldout == [{""}, {rcrl.GOOD}, {rcrl.GOOD}]
    greedy = [{_ending(p) for p in prompts} for prompts, k, t in calls if t == 0.0]
    assert set().union(*greedy) == {rcrl.GOOD, rcrl.BAD}
    assert {rcrl.BAD} in greedy and {rcrl.GOOD} in greedy

    # What the run records: the grown vocabulary in the model config, the tokens'
    # ids, the token evaluation conditions on, the tokenizer that knows them.
    workdir = tmp_path / "straight"
    checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"))
    progress = checkpointer.read_progress()
    checkpointer.close()
    start_vocab = len(tokenizer_lib.load_tokenizer(str(tiny_sft_run / "tokenizer")))
    assert progress["models"]["policy"]["vocab_size"] == start_vocab + 2
    assert progress["return_tokens"] == {rcrl.GOOD: start_vocab, rcrl.BAD: start_vocab + 1}
    assert progress["prompt_conditioning"] == {"policy": rcrl.GOOD}
    assert progress["step_conditioning"] == {"policy": False}
    assert sources.prompt_conditioning(str(workdir)) == (rcrl.GOOD, False)
    assert sources.prompt_conditioning(str(tiny_sft_run)) == ("", False)
    tokenizer = tokenizer_lib.load_tokenizer(str(workdir / "tokenizer"))
    assert rcrl.return_token_ids(tokenizer) == [start_vocab, start_vocab + 1]
    params = _params(workdir)
    chex.assert_shape(params["params"]["embedder"]["embedding"], (start_vocab + 2, 32))
    # Every sample of both rounds, good and bad, stored unconditioned, in the dataset.
    dataset = ei.from_jsonl(
        (workdir / "rcrl" / "dataset_round_1.jsonl").read_bytes(), rcrl.RcrlSample
    )
    assert {s.round for s in dataset} == {0, 1} and len(dataset) <= 2 * 20 * K
    assert all(rcrl.strip_return_tokens(s.prompt) == s.prompt for s in dataset)

    # Interrupted in round 0's sampling (3), its training (7), round 1's sampling (11)
    # and training (16): the same metrics, parameters and dataset files.
    # Global steps: 1 start evaluation, then per round 3 chunks, 1 accumulate,
    # 3 SFT steps, 1 round end.
    _interrupt_at(monkeypatch, [3, 7, 11, 16])
    while True:
        try:
            rcrl_experiment.train(config, str(tmp_path / "resumed"))
            break
        except checkpointing.Preempted:
            continue
    assert _records(tmp_path / "straight") == _records(tmp_path / "resumed")
    chex.assert_trees_all_equal(_params(tmp_path / "straight"), _params(tmp_path / "resumed"))
    for r in range(2):
        name = f"rcrl/dataset_round_{r}.jsonl"
        assert (tmp_path / "straight" / name).read_bytes() == (
            tmp_path / "resumed" / name
        ).read_bytes()

    # Evaluation of the run conditions on the recorded token by itself; an explicit
    # eval.condition_on overrides it.
    eval_config = config_lib.eval_config()
    eval_config.model_source.path = str(workdir)
    eval_config.eval.update(num_examples=4, num_samples=0, max_new_tokens=8, chunk_size=0)
    eval_config.eval.prompt_buckets = (128,)
    eval_config.eval.batch_size = 8
    eval_config.logging.progress_bar = False
    for condition_on, token in [("auto", rcrl.GOOD), (rcrl.BAD, rcrl.BAD), ("none", "")]:
        eval_config.eval.condition_on = condition_on
        calls = _record_prompts(monkeypatch)
        evaluate.run(eval_config, str(tmp_path / f"eval_{condition_on}"))
        monkeypatch.undo()
        assert [{_ending(p) for p in prompts} for prompts, _, _ in calls] == [{token}]
        report = (tmp_path / f"eval_{condition_on}" / "report.md").read_text()
        assert (f"conditioned on `{token}`" in report) == bool(token)
    eval_config.model_source.path = str(tiny_sft_run)
    eval_config.eval.condition_on = rcrl.GOOD
    with pytest.raises(ValueError, match="has no '<\\|good\\|>'"):
        evaluate.run(eval_config, str(tmp_path / "eval_sft"))


def test_rcrl_with_lora_starts_the_return_tokens_as_their_words_and_loads_grown(
    tiny_sft_run, tmp_path
):
    """Under LoRA the embedding is frozen, so the return tokens start apart, each as its
    word (mean rows would stay equal: nothing could tell good from bad). The run trains
    adapters only, records the words, and `load_run` grows the recorded base the same
    way before merging: the loaded model has the run's vocabulary and rows."""
    config = _rcrl_config(tiny_sft_run)
    config.lora.update(rank=4, alpha=8.0)
    config.rcrl.update(num_rounds=1, steps_per_round=2)
    workdir = tmp_path / "lora"
    last = rcrl_experiment.train(config, str(workdir))
    assert last["round"] == 1 and np.isfinite(last["heldout/maj@1"])
    checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"))
    progress = checkpointer.read_progress()
    items = set(checkpointer.read_integrity(checkpointer.latest_step())["items"])
    checkpointer.close()
    assert items == {"policy.lora", "policy.train", "best.lora"}  # no copy of the base
    assert progress["return_token_words"] == list(rcrl.RETURN_WORDS)

    start = sources.load_run(str(tiny_sft_run), mesh_lib.make_mesh((-1, 1, 1)), shd.DEFAULT_RULES)
    tokenizer = start.tokenizer
    embedding = np.asarray(_params(workdir)["params"]["embedder"]["embedding"])
    old = np.asarray(jax.device_get(start.params["params"]["embedder"]["embedding"]))
    assert embedding.shape[0] == old.shape[0] + 2
    np.testing.assert_array_equal(embedding[: old.shape[0]], old)  # frozen, unmerged rows
    ids = progress["return_tokens"]
    for token, word in zip(rcrl.RETURN_TOKENS, rcrl.RETURN_WORDS):
        word_ids = tokenizer.encode(word, add_special_tokens=False)
        want = old[word_ids].mean(axis=0)
        np.testing.assert_allclose(embedding[ids[token]], want, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(embedding[ids[rcrl.GOOD]], embedding[ids[rcrl.BAD]])


@pytest.mark.slow
def test_dense_rcrl_labels_and_conditions_every_step(tiny_sft_run, tmp_path, monkeypatch):
    config = _rcrl_config(tiny_sft_run, mode="dense")
    config.rcrl.update(num_rounds=2, steps_per_round=1, eval_every=1)
    config.rcrl.step_threshold = 0.0  # every step good: the labels must then all be <|good|>
    configs = []
    calls = _record_prompts(monkeypatch, configs)
    rcrl_experiment.train(config, str(tmp_path / "run"))
    monkeypatch.undo()
    dataset_file = tmp_path / "run" / "rcrl" / "dataset_round_0.jsonl"
    dataset = ei.from_jsonl(dataset_file.read_bytes(), rcrl.RcrlSample)
    assert dataset and all(s.step_rewards is not None for s in dataset)
    for s in dataset:
        assert len(s.step_rewards) == len(rcrl.split_steps(s.completion))
    records = _records(tmp_path / "run")
    assert any("good_step_fraction" in r for r in records)
    summary = next(r for r in records if "dataset/good_step_fraction" in r)
    assert np.isclose(summary["dataset/good_step_fraction"], 1.0)

    # A dense model is asked for good steps, not only a good start: every call on a
    # conditioned prompt gives that token after each line (round 0's sampling and the
    # start's evaluation, on the unconditioned start model, give none).
    tokenizer = tokenizer_lib.load_tokenizer(str(tmp_path / "run" / "tokenizer"))
    ids = dict(zip(rcrl.RETURN_TOKENS, rcrl.return_token_ids(tokenizer)))
    line_ends = rcrl.line_end_ids(tokenizer)
    assert line_ends and all(tokenizer.decode([i]).endswith("\n") for i in line_ends)
    for (prompts, _, _), sampling in zip(calls, configs):
        (token,) = {_ending(p) for p in prompts}
        assert sampling.step_token == ids.get(token, -1)
        assert sampling.step_starts == (line_ends if token else ())
    assert {c.step_token for c in configs} == {-1, *ids.values()}
    assert sources.prompt_conditioning(str(tmp_path / "run")) == (rcrl.GOOD, True)

    # Evaluation applies it by itself; eval.condition_steps="first" conditions the start only.
    eval_config = config_lib.eval_config()
    eval_config.model_source.path = str(tmp_path / "run")
    eval_config.eval.update(num_examples=4, num_samples=0, max_new_tokens=8, chunk_size=0)
    eval_config.eval.update(prompt_buckets=(128,), batch_size=8)
    eval_config.logging.progress_bar = False
    for steps, every in [("auto", True), ("first", False)]:
        eval_config.eval.condition_steps = steps
        configs.clear()
        _record_prompts(monkeypatch, configs)
        evaluate.run(eval_config, str(tmp_path / f"eval_{steps}"))
        monkeypatch.undo()
        assert [c.step_token for c in configs] == [ids[rcrl.GOOD] if every else -1]
        report = (tmp_path / f"eval_{steps}" / "report.md").read_text()
        assert ("(and every step)" in report) == every

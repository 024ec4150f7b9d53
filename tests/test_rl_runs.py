"""The RL loops end to end on a tiny model: they run, log what RL is debugged by, and
an interrupted run resumes to exactly the uninterrupted result."""

import json
import os

import jax
import numpy as np
import pytest

from rl_reason import checkpointing
from rl_reason.experiments import expert_iteration, on_policy, rollout, sources
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
import subprocess_runs

from configs import arith_ei, arith_grpo, arith_ppo

# Wall times differ between runs; everything else must not.
TIMING = (
    "sample_seconds",
    "update_seconds",
    "sampling_tokens_per_second",
    "update_tokens_per_second",
)


def _on_policy_config(module, start):
    config = module.get_config()
    config.model_source.path = str(start)
    config.data.update(num_train=64, num_eval=16)
    config.rl.update(
        num_iterations=3,
        prompts_per_iteration=8,
        num_samples=2,
        max_new_tokens=12,
        sampling_batch_size=8,
        eval_every=3,
        prompt_buckets=(128,),
    )
    config.ppo.update(num_epochs=2, num_minibatches=2)
    config.eval.update(num_examples=8, num_samples=2, max_new_tokens=12)
    config.logging.update(progress_bar=False, tensorboard=False)
    return config


def _ei_config(start):
    config = arith_ei.get_config()
    config.model_source.path = str(start)
    config.data.update(num_train=24, num_validation=8, num_eval=8)
    config.ei.update(
        num_rounds=2,
        num_samples=2,
        max_new_tokens=12,
        sampling_batch_size=8,
        sampling_chunk=8,
        steps_per_round=4,
        eval_every=2,
        prompt_buckets=(128,),
        threshold=0.0,
    )
    config.eval.update(num_examples=8, num_samples=2, max_new_tokens=12)
    config.train.update(batch_size=8, max_length=128, log_every=1)
    config.checkpoint.save_interval_steps = 1
    config.logging.update(progress_bar=False, tensorboard=False)
    return config


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _params(workdir, name="policy"):
    mesh = mesh_lib.make_mesh((-1, 1, 1))
    loaded = sources.load_run(str(workdir), mesh, shd.DEFAULT_RULES, name)
    return jax.device_get(loaded.params)


def _interrupt_at(monkeypatch, steps):
    """Make the preemption guard fire after each of `steps` (the loop saves, then raises)."""
    pending = sorted(steps)
    monkeypatch.setattr(
        checkpointing.PreemptionGuard,
        "should_stop",
        lambda self, step: bool(pending) and step >= pending[0] and pending.pop(0) is not None,
    )


def _run_until_done(train, config, workdir):
    while True:
        try:
            return train(config, str(workdir))
        except checkpointing.Preempted:
            continue


def _assert_same_run(a, b):
    assert _records(a) == _records(b)
    for x, y in zip(jax.tree.leaves(_params(a)), jax.tree.leaves(_params(b))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, engine",
    [(arith_ppo, "static"), (arith_grpo, "static"), (arith_grpo, "continuous")],
    ids=["ppo", "grpo", "grpo-continuous"],  # the engine's slots over the 8 batch shards
)
def test_on_policy_run_logs_and_resumes_exactly(
    tiny_sft_run, tmp_path, monkeypatch, module, engine
):
    config = _on_policy_config(module, tiny_sft_run)
    config.sampling.engine = engine
    straight = on_policy.train(config, str(tmp_path / "straight"))
    for key in (
        "reward_mean",
        "reward/correctness",
        "entropy",
        "clip_fraction",
        "approx_kl",
        "grad_norm",
        "response_length",
        "cut_by_length",
        "heldout/maj@1",
        "heldout/pass@2",
        "samples_drawn",
    ):
        assert key in straight, key
    assert straight["samples_drawn"] == 3 * 8 * 2
    if module is arith_ppo:
        assert {"kl_k1", "kl_k2", "kl_k3", "value_loss", "explained_variance"} <= set(straight)
    else:
        assert {"kl_loss", "zero_variance_groups"} <= set(straight)

    start = _records(tmp_path / "straight")[0]  # the start model, before any update
    assert start["step"] == 0 and start["samples_drawn"] == 0 and "heldout/maj@1" in start

    _interrupt_at(monkeypatch, [1, 2])
    _run_until_done(on_policy.train, config, tmp_path / "resumed")
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.slow
def test_ppo_with_a_separate_critic_trains_it_and_resumes_exactly(
    tiny_sft_run, tmp_path, monkeypatch
):
    """critic.kind="start": a copy of the start model with a value head, trained by the
    same optimizer, checkpointed beside the policy (which has no value head of its own)."""
    config = _on_policy_config(arith_ppo, tiny_sft_run)
    config.critic.kind = "start"
    last = on_policy.train(config, str(tmp_path / "straight"))
    assert {"value_loss", "explained_variance", "kl_k1"} <= set(last)

    policy, critic = (_params(tmp_path / "straight", name) for name in ("policy", "critic"))
    assert "scalar_heads_value" not in policy["params"]
    assert "scalar_heads_value" in critic["params"]
    start = jax.device_get(
        sources.load_run(
            str(tiny_sft_run), mesh_lib.make_mesh((-1, 1, 1)), shd.DEFAULT_RULES
        ).params
    )
    trunk = lambda tree: tree["params"]["layers"]
    moved = lambda tree: any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(trunk(start)), jax.tree.leaves(trunk(tree)))
    )
    assert moved(policy) and moved(critic)  # both trained

    _interrupt_at(monkeypatch, [1, 2])
    _run_until_done(on_policy.train, config, tmp_path / "resumed")
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    resumed = _params(tmp_path / "resumed", "critic")
    for x, y in zip(jax.tree.leaves(critic), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_expert_iteration_resumes_mid_sampling_and_mid_training(
    tiny_sft_run, tmp_path, monkeypatch
):
    config = _ei_config(tiny_sft_run)
    last = expert_iteration.train(config, str(tmp_path / "straight"))
    assert last["round"] == 2 and last["samples_drawn"] == 2 * 24 * 2
    records = _records(tmp_path / "straight")
    assert not any(k.startswith("mismatch/") for r in records for k in r)  # float32: alike
    start = _records(tmp_path / "straight")[0]
    assert start["samples_drawn"] == 0 and "heldout/maj@1" in start
    # Global steps: 1 start evaluation, then per round 3 sampling chunks, 1 accumulate,
    # 4 SFT steps, 1 round end. Interrupt after the start evaluation (1), in round 0's
    # sampling (2), its training (6), round 1's sampling (11) and training (16).
    _interrupt_at(monkeypatch, [1, 2, 6, 11, 16])
    _run_until_done(expert_iteration.train, config, tmp_path / "resumed")
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    for r in range(2):
        a = open(tmp_path / "straight" / "ei" / f"dataset_round_{r}.jsonl", "rb").read()
        b = open(tmp_path / "resumed" / "ei" / f"dataset_round_{r}.jsonl", "rb").read()
        assert a == b


def test_a_finished_rl_run_changes_nothing(tiny_sft_run, tmp_path, capsys):
    config = _on_policy_config(arith_grpo, tiny_sft_run)
    config.rl.num_iterations = 1
    on_policy.train(config, str(tmp_path / "run"))
    before = open(tmp_path / "run" / "metrics.jsonl").read()
    again = on_policy.train(config, str(tmp_path / "run"))
    assert "nothing to do" in capsys.readouterr().out
    assert again["step"] == 1 and open(tmp_path / "run" / "metrics.jsonl").read() == before


@pytest.mark.slow
def test_ppo_killed_with_sigkill_at_several_points_ends_like_an_uninterrupted_run(
    tiny_sft_run, tmp_path
):
    """A real process death (SIGKILL: no handler, no save) mid-iteration, three times."""
    overrides = [
        f"--config.model_source.path={tiny_sft_run}",
        "--config.data.num_train=64",
        "--config.data.num_eval=16",
        "--config.rl.num_iterations=5",
        "--config.rl.prompts_per_iteration=8",
        "--config.rl.num_samples=2",
        "--config.rl.max_new_tokens=12",
        "--config.rl.sampling_batch_size=8",
        "--config.rl.eval_every=5",
        "--config.rl.prompt_buckets=(128,)",
        "--config.eval.num_examples=8",
        "--config.eval.num_samples=2",
        "--config.eval.max_new_tokens=12",
        "--config.logging.progress_bar=False",
        "--config.logging.tensorboard=False",
    ]
    command = lambda workdir: subprocess_runs.train_command(workdir, "arith_ppo.py", overrides)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess_runs.run(command(straight))
    for kill_after in (1, 2, 4):  # records on disk when the kill comes
        subprocess_runs.kill_when(
            command(killed),
            lambda: len(subprocess_runs.records(killed)) >= kill_after,
            f"{kill_after} records",
            log=tmp_path / "killed.log",
        )
    subprocess_runs.run(command(killed))
    _assert_same_run(straight, killed)


@pytest.mark.slow
def test_ei_killed_with_sigkill_mid_sampling_and_mid_training_ends_like_an_uninterrupted_run(
    tiny_sft_run, tmp_path
):
    """Three real process deaths: as round 0's first sampling chunk lands, inside round
    0's SFT phase, inside a sampling chunk of round 1; then the same command again.

    Kill points are found by watching the run's files (chunk files, records,
    checkpoints), not by step numbers. Checkpoints are written synchronously
    here, so a chunk's checkpoint appearing means the next chunk's sampling has
    begun (an asynchronous save lands somewhere inside it).
    """
    config = _ei_config(tiny_sft_run)
    config.ei.max_new_tokens = 32  # a chunk samples long enough to be killed inside
    config.checkpoint.async_save = False
    overrides = subprocess_runs.config_overrides(config, arith_ei.get_config())
    command = lambda workdir: subprocess_runs.train_command(workdir, "arith_ei.py", overrides)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess_runs.run(command(straight))
    chunks_per_round = -(-config.data.num_train // config.ei.sampling_chunk)
    assert chunks_per_round >= 2

    def chunk_files(r):
        directory = killed / "ei" / f"round_{r}"
        return sorted(directory.glob("chunk_*.jsonl")) if directory.is_dir() else []

    def records_of(r, key):
        return [x for x in subprocess_runs.records(killed) if x.get("round") == r and key in x]

    def inside_a_chunk(r):
        """Chunk k < last of round r sampled and checkpointed: chunk k+1 is sampling."""
        files, sampled = chunk_files(r), records_of(r, "kept")
        return (
            0 < len(files) < chunks_per_round
            and len(sampled) == len(files)
            and sampled[-1]["step"] in subprocess_runs.checkpoint_steps(killed)
        )

    kill = lambda condition, what: subprocess_runs.kill_when(
        command(killed), condition, what, log=tmp_path / "killed.log"
    )
    # 1. Mid-sampling, between chunks: round 0's first chunk file is written (its
    # checkpoint may or may not be).
    kill(lambda: len(chunk_files(0)) >= 1, "round 0's first chunk")
    progress = subprocess_runs.latest_progress(killed)
    assert progress is None or (progress["round"], progress["phase"]) == (0, "sample"), progress

    # 2. Mid-training: round 0's SFT phase has logged a step.
    kill(lambda: records_of(0, "loss"), "an SFT step of round 0")
    progress = subprocess_runs.latest_progress(killed)
    assert (progress["round"], progress["phase"]) == (0, "train"), progress
    assert progress["sft_step"] < config.ei.steps_per_round, progress

    # 3. Mid-sampling, inside a chunk of round 1 (the one after a checkpointed chunk).
    kill(lambda: inside_a_chunk(1), "a checkpointed chunk of round 1 with one to follow")
    progress = subprocess_runs.latest_progress(killed)
    assert (progress["round"], progress["phase"]) == (1, "sample"), progress
    assert len(chunk_files(1)) == progress["chunk"] < chunks_per_round, (
        "the kill came after the next chunk's samples were written",
        progress,
    )

    subprocess_runs.run(command(killed))
    _assert_same_run(straight, killed)
    assert sources.checksum(_params(killed)) == sources.checksum(_params(straight))
    for r in range(config.ei.num_rounds):
        name = f"dataset_round_{r}.jsonl"
        assert (killed / "ei" / name).read_bytes() == (straight / "ei" / name).read_bytes()


@pytest.mark.slow
def test_an_ei_round_that_keeps_nothing_trains_nothing(tiny_sft_run, tmp_path):
    config = _ei_config(tiny_sft_run)
    config.ei.update(num_rounds=1, threshold=2.0)  # no reward reaches 2
    last = expert_iteration.train(config, str(tmp_path / "run"))
    assert last["dataset_size"] == 0 and last["samples_drawn"] == 24 * 2
    start = jax.device_get(
        sources.load_run(
            str(tiny_sft_run), mesh_lib.make_mesh((-1, 1, 1)), shd.DEFAULT_RULES
        ).params
    )
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(_params(tmp_path / "run"))):
        np.testing.assert_array_equal(a, b)  # the round's model is the start model


@pytest.mark.slow
def test_every_ei_sampling_chunk_is_checkpointed_whatever_the_interval(
    tiny_sft_run, tmp_path, monkeypatch
):
    """A kill mid-sampling loses at most the chunk being sampled (SIGKILL gives no save)."""
    config = _ei_config(tiny_sft_run)
    config.ei.num_rounds = 1
    config.checkpoint.save_interval_steps = 1000
    saved = []
    original = checkpointing.Checkpointer.save

    def record(self, step, items, progress, *, force=False):
        did = original(self, step, items, progress, force=force)
        if did:
            saved.append((progress["phase"], progress["chunk"]))
        return did

    monkeypatch.setattr(checkpointing.Checkpointer, "save", record)
    expert_iteration.train(config, str(tmp_path / "run"))
    # The start model's evaluation, each of the 3 chunks, then the dataset (train phase)
    # and the round's end (next round, chunk 0).
    assert saved[:4] == [("sample", 0), ("sample", 1), ("sample", 2), ("sample", 3)]


def test_critic_and_remat_settings_are_checked_before_anything_runs():
    from rl_reason.experiments import config as config_lib

    config = arith_ppo.get_config()
    config.model_source.path = "runs/sft"
    config_lib.validate_rl(config, num_devices=1)
    config.critic.update(kind="hf", path="")
    config.rl.remat = "most"
    with pytest.raises(config_lib.InvalidConfigError) as error:
        config_lib.validate_rl(config, num_devices=1)
    assert "critic.path is empty" in str(error.value) and "rl.remat='most'" in str(error.value)
    grpo = arith_grpo.get_config()
    grpo.model_source.path = "runs/sft"
    grpo.critic.kind = "start"
    with pytest.raises(config_lib.InvalidConfigError, match="ppo.use_value=False"):
        config_lib.validate_rl(grpo, num_devices=1)
    # A group or REINFORCE++ estimator on PPO's config: no returns for its value head.
    config = arith_ppo.get_config()
    config.rl.update(advantage="reinforce_pp", dynamic_sampling=True, num_samples=1)
    config.rl.overlong_buffer = config.rl.max_new_tokens + 1
    with pytest.raises(config_lib.InvalidConfigError) as error:
        config_lib.validate_rl(config, num_devices=1)
    for problem in ("gives no returns", "dynamic_sampling needs", "rl.overlong_buffer"):
        assert problem in str(error.value)


@pytest.mark.slow
def test_a_bfloat16_sampler_is_measured_against_the_float32_learner_and_corrected(
    tiny_sft_run, tmp_path
):
    """sampling.dtype=bfloat16 with a float32 learner: every iteration logs the
    mismatch (KL, token ratios) and the correction it applied (auto: token TIS)."""
    config = _on_policy_config(arith_grpo, tiny_sft_run)
    config.sampling.dtype = "bfloat16"
    on_policy.train(config, str(tmp_path / "bf16"))
    iterations = [r for r in _records(tmp_path / "bf16") if "reward_mean" in r]
    assert len(iterations) == 3
    for record in iterations:
        assert record["finite"] == 1.0
        assert record["mismatch/tokens"] > 0 and record["mismatch/kl_k3_mean"] >= 0
        assert 0 < record["mismatch/ratio_min"] <= record["mismatch/ratio_max"]
        assert record["mismatch/ratio_min"] < 1 < record["mismatch/ratio_max"]  # bf16 differs
        assert record["mismatch/correction/weight_max"] <= 2.0  # TIS at C = 2
    # With both sides in float32 there is nothing to measure or correct: the update is
    # the one it always was (tests/compare_runs.py: bitwise).
    from rl_reason.models.config import ModelConfig

    float32 = _on_policy_config(arith_grpo, tiny_sft_run)
    assert on_policy.correction_mode(float32, ModelConfig()) is None
    assert on_policy.correction_mode(config, ModelConfig()) == ("token_tis", None)


@pytest.mark.slow
def test_expert_iteration_logs_a_bfloat16_samplers_mismatch_per_chunk(tiny_sft_run, tmp_path):
    """EI's rounds sample with sampling.dtype too: each chunk's record says how far the
    bfloat16 sampler's log-probs are from the float32 learner's; in float32, nothing."""
    config = _ei_config(tiny_sft_run)
    config.ei.num_rounds = 1
    config.sampling.dtype = "bfloat16"
    expert_iteration.train(config, str(tmp_path / "bf16"))
    chunks = [r for r in _records(tmp_path / "bf16") if "mismatch/tokens" in r]
    assert len(chunks) == 3  # 24 questions in chunks of 8
    for record in chunks:
        assert record["mismatch/tokens"] > 0 and record["mismatch/kl_k3_mean"] >= 0
        assert 0 < record["mismatch/ratio_min"] < 1 < record["mismatch/ratio_max"]
    assert rollout.combine_mismatch(
        [{"mismatch/tokens": 3, "mismatch/ratio_max": 2.0, "mismatch/ratio_min": 0.5,
          "mismatch/kl_k3_mean": 0.1},
         {"mismatch/tokens": 5, "mismatch/ratio_max": 1.5, "mismatch/ratio_min": 0.25,
          "mismatch/kl_k3_mean": 0.3}]
    ) == pytest.approx({"mismatch/tokens": 8, "mismatch/ratio_max": 2.0,
                        "mismatch/ratio_min": 0.25, "mismatch/kl_k3_mean": 0.2})  # fmt: skip


class _OddLength:
    """A reward that splits most groups of two: 1 for a completion of odd length."""

    dense = False

    def __call__(self, completions, batch):
        del batch
        return [float(len(text) % 2) for text in completions]


class _CrashInRefill(BaseException):
    """Stands in for a SIGKILL: a refill writes nothing, so dying anywhere in it leaves
    the files this leaves (the last iteration's checkpoint, nothing after it)."""


@pytest.mark.slow
def test_dapo_batches_are_always_full_and_a_crash_in_a_refill_resumes_bitwise(
    tiny_sft_run, tmp_path, monkeypatch
):
    from rl_reason.algorithms import ppo
    from rl_reason.rewards import registry

    from configs import arith_dapo

    if "odd_length" not in registry.names():
        registry.register("odd_length", _OddLength)
    config = _on_policy_config(arith_dapo, tiny_sft_run)
    config.rl.update(
        rewards={"odd_length": 1.0}, max_refill_rounds=3, overlong_buffer=4, overlong_filter=True
    )
    rows, calls = [], []
    from_rollout = ppo.PPOBatch.from_rollout

    def counting(*args, **kwargs):
        batch = from_rollout(*args, **kwargs)
        rows.append(batch.tokens.shape[0])
        return batch

    monkeypatch.setattr(ppo.PPOBatch, "from_rollout", counting)
    straight = on_policy.train(config, str(tmp_path / "straight"))
    records = _records(tmp_path / "straight")[1:]  # after the start's evaluation
    assert rows == [8 * 2] * 3  # every update's batch is full
    draws = [r["dynamic_sampling/rounds"] for r in records]
    assert draws[1] >= 2, draws  # iteration 2 refilled (the kill point below)
    assert straight["samples_drawn"] == sum(draws) * 8 * 2
    for r in records:
        assert r["dynamic_sampling/extra_samples"] == (r["dynamic_sampling/rounds"] - 1) * 16
        assert {"overlong/penalty_mean", "overlong/filtered_fraction"} <= set(r)
    assert sum(r["dynamic_sampling/filled_uninformative"] for r in records) < 3 * 8

    collect = on_policy.OnPolicyLearner._collect

    def crashing(self, *args):
        calls.append(1)
        if len(calls) == draws[0] + 2:  # iteration 2's first refill
            raise _CrashInRefill
        return collect(self, *args)

    monkeypatch.setattr(on_policy.OnPolicyLearner, "_collect", crashing)
    with pytest.raises(_CrashInRefill):
        on_policy.train(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(on_policy.OnPolicyLearner, "_collect", collect)
    on_policy.train(config, str(tmp_path / "resumed"))
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.slow
def test_grpo_with_lora_trains_adapters_resumes_bitwise_and_knows_its_base(
    tiny_sft_run, tmp_path, monkeypatch
):
    """lora.rank > 0: adapters on the frozen start (also the KL reference), checkpoints of
    adapters and heads only, a policy `load_run` merges from the recorded base, an exact
    resume, and a resume on another base refused."""
    from rl_reason.rewards import registry

    if "odd_length" not in registry.names():
        registry.register("odd_length", _OddLength)
    config = _on_policy_config(arith_grpo, tiny_sft_run)
    config.rl.rewards = {"odd_length": 1.0}  # a reward the tiny start earns half the time
    config.lora.update(rank=4, alpha=8.0)
    last = on_policy.train(config, str(tmp_path / "straight"))
    assert last["finite"] == 1.0 and last["kl_loss"] > 0  # moved away from the reference
    checkpoint = checkpointing.Checkpointer(str(tmp_path / "straight" / "checkpoints"))
    items = set(checkpoint.read_integrity(checkpoint.latest_step())["items"])
    checkpoint.close()
    assert items == {"policy.lora", "policy.train"}  # no copy of the base
    start = jax.tree.leaves(_params(tiny_sft_run))
    merged = jax.tree.leaves(_params(tmp_path / "straight"))
    assert len(start) == len(merged) and any(
        not np.array_equal(a, b) for a, b in zip(start, merged)
    )

    _interrupt_at(monkeypatch, [1, 2])
    _run_until_done(on_policy.train, config, tmp_path / "resumed")
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")

    from rl_reason.experiments import sft
    import conftest

    other = conftest.tiny_sft_config()
    other.seed = 1
    sft.train(other, str(tmp_path / "other_start"))
    config.rl.num_iterations = 4
    config.model_source.path = str(tmp_path / "other_start")
    with pytest.raises(Exception, match="LoRA run's base changed"):
        on_policy.train(config, str(tmp_path / "straight"))


def test_expert_iteration_with_lora_keeps_adapters_only_and_resumes_bitwise(
    tiny_sft_run, tmp_path, monkeypatch
):
    """EI with lora.rank > 0: each round trains adapters on the frozen start (fresh ones:
    the study restarts every round from the start model), checkpoints hold adapters (the
    state's and the chosen model's), never the base; a resume mid-sampling and
    mid-training ends bitwise like the uninterrupted run, and `load_run` merges it."""
    config = _ei_config(tiny_sft_run)
    config.lora.update(rank=4, alpha=8.0)
    config.optim.update(lr=1e-2, warmup_steps=0)
    last = expert_iteration.train(config, str(tmp_path / "straight"))
    assert last["round"] == 2 and last["samples_drawn"] == 2 * 24 * 2
    checkpoint = checkpointing.Checkpointer(str(tmp_path / "straight" / "checkpoints"))
    items = set(checkpoint.read_integrity(checkpoint.latest_step())["items"])
    checkpoint.close()
    assert items == {"policy.lora", "policy.train", "best.lora"}  # no copy of the base
    start = jax.tree.leaves(_params(tiny_sft_run))
    merged = jax.tree.leaves(_params(tmp_path / "straight"))
    moved = [not np.array_equal(a, b) for a, b in zip(start, merged)]
    assert any(moved) and not all(moved)  # adapted kernels moved; norms, embeddings not

    _interrupt_at(monkeypatch, [2, 6, 11, 16])
    _run_until_done(expert_iteration.train, config, tmp_path / "resumed")
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")

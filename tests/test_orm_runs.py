"""The ORM run end to end: its config checks, the labelled samples it writes, an exact
resume, the ORM served to evaluation's rerank@K, and (slow) an ORM that separates the
right and wrong samples of an imperfect SFT policy on the synthetic task."""

import dataclasses
import json
from typing import ClassVar

import chex
import jax
import ml_collections
import numpy as np
import pytest
from test_rl_runs import _interrupt_at, _on_policy_config, _params, _records, _run_until_done

from rl_reason import checkpointing
from rl_reason.algorithms import orm as orm_lib
from rl_reason.data import templates
from rl_reason.experiments import config as config_lib
from rl_reason.experiments import evaluate, registry, rollout, sources, tasks
from rl_reason.experiments import on_policy
from rl_reason.experiments import orm as orm_experiment
from rl_reason.experiments.cli import ModelSourceNotFoundError
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from rl_reason.rewards import compose
from rl_reason.rewards import registry as reward_registry

from configs import arith_orm, arith_ppo

EVEN = "test_even_length"


@dataclasses.dataclass(frozen=True)
class _EvenLength:
    """1 for a completion of even length: both labels among a tiny model's samples,
    which are never correct."""

    dense: ClassVar[bool] = False

    def __call__(self, completions, batch):
        return [float(len(text) % 2 == 0) for text in completions]


if EVEN not in reward_registry.names():
    reward_registry.register(EVEN, _EvenLength)


def _orm_config(start, num_steps=4):
    config = arith_orm.get_config()
    config.model_source.path = str(start)
    config.data.update(num_train=12, num_validation=0, num_eval=8)
    config.orm.update(
        num_samples=2,
        max_new_tokens=12,
        sampling_batch_size=8,
        sampling_chunk=8,
        prompt_buckets=(128,),
        score_batch_size=8,
        rewards=ml_collections.ConfigDict({EVEN: 1.0}),
    )
    config.eval.update(num_examples=8, num_samples=2, max_new_tokens=12)
    config.train.update(num_steps=num_steps, batch_size=8, max_length=128, log_every=1)
    config.train.eval_every = 2
    config.checkpoint.save_interval_steps = 1
    config.logging.update(progress_bar=False, tensorboard=False)
    return config


@pytest.fixture(scope="module")
def orm_run(tiny_sft_run, tmp_path_factory):
    """(config, workdir, last metrics) of an uninterrupted tiny ORM run."""
    config = _orm_config(tiny_sft_run)
    workdir = tmp_path_factory.mktemp("orm")
    return config, workdir, orm_experiment.train(config, str(workdir))


def test_an_orm_config_is_checked_before_anything_compiles():
    assert registry.trainer(arith_orm.get_config()) is orm_experiment.train
    orm_experiment.validate_orm(arith_orm.get_config())  # the shipped config is valid
    config = arith_orm.get_config()
    config.model_source.path = ""
    config.orm.update(num_samples=0, sampling_batch_size=6)
    config.orm.rewards = ml_collections.ConfigDict({"correctness": 1.0, "nonsense": 1.0})
    config.orm.init_source.kind = "onnx"
    config.train.batch_size = 30
    with pytest.raises(config_lib.InvalidConfigError) as error:
        orm_experiment.validate_orm(config)
    problems = error.value.problems
    for expected in (
        "orm.num_samples",
        "'nonsense'",
        "model_source.path is empty",
        "'onnx'",
        "orm.sampling_batch_size=6",
        "micro-batch of 30 rows",
    ):
        assert any(expected in p for p in problems), (expected, problems)


def test_an_orm_run_labels_its_samples_trains_and_saves_a_loadable_orm(orm_run, tiny_sft_run):
    config, workdir, last = orm_run
    # 12 train questions x 2 samples, then 8 held-out questions x 2.
    assert last["samples_drawn"] == 12 * 2 + 8 * 2 and last["orm_step"] == 4
    for key in (
        "loss",
        "final_accuracy",
        "positive_fraction",
        "grad_norm",
        "heldout/auc",
        "heldout/within_question_auc",
        "heldout/accuracy",
        "heldout/positive_fraction",
        "heldout/maj@2",
        "heldout/rerank@2",
        "heldout/pass@2",
    ):
        assert key in last, key

    progress = checkpointing.Checkpointer(str(workdir / "checkpoints")).read_progress()
    assert progress["phase"] == orm_experiment.DONE
    task = tasks.load(config)
    task_questions = {"train": task.train, "heldout": task.heldout}
    reward_fn = compose.compose(config.orm.rewards.to_dict())
    for split, questions in task_questions.items():
        samples = rollout.read_records(
            str(workdir / "orm" / f"{split}.jsonl"), progress["datasets"][split]["digest"]
        )
        assert len(samples) == len(questions) * 2 == progress["datasets"][split]["count"]
        assert [s.question_id for s in samples] == [i for i in range(len(questions)) for _ in "kk"]
        assert all(
            s.prompt == templates.format_prompt(questions[s.question_id]["question"])
            for s in samples
        )
        # The label is the configured reward of the completion, as the library computes it.
        texts = [s.completion for s in samples]
        columns = {"final_answer": [questions[s.question_id]["final_answer"] for s in samples]}
        assert [s.reward for s in samples] == reward_fn(texts, columns).totals
        labels = [s.reward >= config.orm.threshold for s in samples]
        assert 0 < sum(labels) < len(labels)  # both classes: the AUC is defined
        np.testing.assert_allclose(
            progress["datasets"][split]["positive_fraction"], np.mean(labels)
        )

    # The ORM is the run's `orm` model: a scalar head on the start model, trained.
    mesh = mesh_lib.make_mesh((-1, 1, 1))
    loaded = sources.load_model("run", str(workdir), mesh, shd.DEFAULT_RULES, name="orm")
    assert "orm" in loaded.config.heads
    start = sources.load_model("run", str(tiny_sft_run), mesh, shd.DEFAULT_RULES)
    chex.assert_trees_all_equal_structs(
        {k: v for k, v in loaded.params["params"].items() if k != "scalar_heads_orm"},
        start.params["params"],
    )
    assert not np.allclose(
        jax.device_get(loaded.params["params"]["final_norm"]["scale"]),
        jax.device_get(start.params["params"]["final_norm"]["scale"]),
    )
    with pytest.raises(ModelSourceNotFoundError, match="no model 'policy'"):
        sources.load_model("run", str(workdir), mesh, shd.DEFAULT_RULES)


def test_a_finished_orm_run_changes_nothing(orm_run, capsys):
    config, workdir, last = orm_run
    before = (workdir / "metrics.jsonl").read_text()
    steps = checkpointing.Checkpointer(str(workdir / "checkpoints")).all_steps()
    again = orm_experiment.train(config, str(workdir))
    assert "nothing to do" in capsys.readouterr().out
    assert again == last and (workdir / "metrics.jsonl").read_text() == before
    assert checkpointing.Checkpointer(str(workdir / "checkpoints")).all_steps() == steps


def test_evaluation_reranks_by_an_orm_run(orm_run, tiny_sft_run, tmp_path):
    _, workdir, _ = orm_run
    config = config_lib.eval_config()
    config.model_source.path = str(tiny_sft_run)
    config.logging.progress_bar = False
    config.eval.update(
        num_examples=8, num_samples=3, max_new_tokens=12, batch_size=8, prompt_buckets=(64,)
    )
    plain = evaluate.run(config, str(tmp_path / "plain"))
    config.eval.update(orm_source=str(workdir), orm_length_buckets=(128,))
    reranked = evaluate.run(config, str(tmp_path / "plain"))  # the same samples, reused
    assert "rerank@3" not in plain and "rerank@3" in reranked
    assert {k: v for k, v in reranked.items() if not k.startswith("rerank")} == plain
    lines = (tmp_path / "plain" / "eval_samples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    scores = [row["orm_scores"] for row in rows]
    chex.assert_shape(np.asarray(scores), (8, 3))
    # The scores are the ORM's final-token scores, as its scorer gives them directly.
    mesh = mesh_lib.make_mesh((-1, 1, 1))
    scorer = sources.orm_scorer(
        str(workdir), mesh, shd.DEFAULT_RULES, batch_size=8, length_buckets=(128,)
    )
    row = rows[0]
    prompt = templates.format_prompt(row["question"])
    direct = scorer(row["samples"], {"prompt": [prompt] * 3}, [[len(t)] for t in row["samples"]])
    chex.assert_trees_all_close(np.asarray(direct)[:, 0], np.asarray(scores[0]), atol=1e-5)


@pytest.mark.slow
def test_ppo_is_rewarded_by_the_orm_run_it_names(orm_run, tiny_sft_run, tmp_path):
    """The study's ORM reward: PPO pays each sample the ORM's final-token score (a
    probability); a config naming an ORM reward without an ORM is refused first."""
    _, orm_dir, _ = orm_run
    config = _on_policy_config(arith_ppo, tiny_sft_run)
    config.rl.update(num_iterations=1, eval_every=0, rewards=ml_collections.ConfigDict(
        {"orm_outcome": 1.0}))  # fmt: skip
    config.eval.at_start = False
    with pytest.raises(config_lib.InvalidConfigError, match="rl.orm_source"):
        config_lib.validate_rl(config)
    config.rl.update(orm_source=str(orm_dir), orm_length_buckets=(128,))
    metrics = on_policy.train(config, str(tmp_path / "ppo"))
    assert 0.0 < metrics["reward/orm_outcome"] < 1.0
    assert metrics["reward_mean"] == pytest.approx(metrics["reward/orm_outcome"])


@pytest.mark.slow
def test_an_orm_run_resumes_mid_sampling_and_mid_training(orm_run, tmp_path, monkeypatch):
    config, straight, _ = orm_run
    # Global steps: 2 train chunks, 1 held-out chunk, 1 assembly, 4 ORM steps.
    # Interrupt mid-sampling (1), at the assembly (4) and mid-training (5, 6: an evaluation).
    _assert_resumes_like(straight, config, tmp_path / "resumed", monkeypatch, [1, 4, 5, 6])
    for split in ("train", "heldout"):
        name = f"orm/{split}.jsonl"
        assert (straight / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


@pytest.mark.slow
def test_a_balanced_joint_objective_orm_run_trains_on_its_subset_and_resumes(
    tiny_sft_run, tmp_path, monkeypatch
):
    """orm.balance_questions and orm.lm_loss_weight: the run trains on the questions with
    both outcomes, as many of each, and a resumed run equals the uninterrupted one."""
    config = _orm_config(tiny_sft_run)
    config.orm.update(balance_questions=True, lm_loss_weight=0.5, num_samples=4)
    straight = orm_experiment.train(config, str(tmp_path / "straight"))
    samples = rollout.read_records(str(tmp_path / "straight" / "orm" / "train.jsonl"))
    labels = [float(s.reward >= config.orm.threshold) for s in samples]
    keep = orm_lib.balanced_within_questions(
        [s.question_id for s in samples], labels, one_sided=config.orm.one_sided_samples
    )
    assert 0 < len(keep) < len(samples) and straight["train_samples"] == len(keep)
    assert "lm_loss" in straight and np.isfinite(straight["lm_loss"])
    _assert_resumes_like(tmp_path / "straight", config, tmp_path / "resumed", monkeypatch, [5, 6])


@pytest.mark.slow
def test_validation_selects_the_orm_and_a_resumed_run_selects_the_same(
    tiny_sft_run, tmp_path, monkeypatch
):
    """data.num_validation: validation samples drawn like the held-out ones, measured at
    every evaluation; the best within-question AUC's ORM is the run's, its held-out
    figures logged again as selected/heldout/* (the same as at its step: the same
    params), and a run interrupted mid-sampling and mid-training selects the same."""
    config = _orm_config(tiny_sft_run)
    config.data.num_validation = 4
    config.train.eval_every = 1
    straight = tmp_path / "straight"
    last = orm_experiment.train(config, str(straight))
    records = _records(straight)
    measured = [r for r in records if "validation/auc" in r or "validation/accuracy" in r]
    assert len(measured) == 4
    chosen = last["selected_step"]
    at_chosen = next(r for r in measured if r["orm_step"] == chosen)
    scores = [orm_experiment.selection_score(_strip(r, "validation/")) for r in measured]
    assert at_chosen is measured[scores.index(max(s for s in scores if s is not None))]
    for key, value in _strip(at_chosen, "heldout/").items():
        np.testing.assert_allclose(last[f"selected/heldout/{key}"], value, rtol=1e-6, err_msg=key)
    assert len(rollout.read_records(str(straight / "orm" / "validation.jsonl"))) == 4 * 2
    # Global steps: 2 train chunks, 1 held-out, 1 validation, 1 assembly, 4 ORM steps.
    _assert_resumes_like(straight, config, tmp_path / "resumed", monkeypatch, [3, 5, 7, 8])


def _assert_resumes_like(straight, config, resumed, monkeypatch, interrupt_steps):
    """A run of `config` in `resumed`, preempted at each of `interrupt_steps` and
    restarted, ends with the metrics and ORM parameters of the one in `straight`."""
    _interrupt_at(monkeypatch, interrupt_steps)
    _run_until_done(orm_experiment.train, config, resumed)
    assert _records(straight) == _records(resumed)
    for a, b in zip(
        jax.tree.leaves(_params(straight, "orm")), jax.tree.leaves(_params(resumed, "orm"))
    ):
        np.testing.assert_array_equal(a, b)


def _strip(record, prefix):
    return {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}


def test_an_orm_with_lora_trains_adapters_and_head_only_and_resumes_bitwise(
    tiny_sft_run, tmp_path, monkeypatch
):
    """lora.rank > 0: the ORM trains adapters and its head on the frozen start; the
    checkpoint holds those (and the selected ORM's), never the base; `load_run` merges
    them (the head moved, the embeddings did not), and a resumed run equals the straight."""
    config = _orm_config(tiny_sft_run)
    config.data.num_validation = 4
    config.lora.update(rank=4, alpha=8.0)
    straight = tmp_path / "straight"
    last = orm_experiment.train(config, str(straight))
    assert "selected_step" in last
    assert all(np.isfinite(r["loss"]) for r in _records(straight) if "loss" in r)
    checkpoint = checkpointing.Checkpointer(str(straight / "checkpoints"))
    items = set(checkpoint.read_integrity(checkpoint.latest_step())["items"])
    checkpoint.close()
    assert items == {"orm.lora", "orm.train", "best.lora"}
    trained = jax.device_get(_params(straight, "orm"))["params"]
    start = jax.device_get(_params(tiny_sft_run))["params"]
    np.testing.assert_array_equal(trained["embedder"]["embedding"], start["embedder"]["embedding"])
    assert "scalar_heads_orm" in str(jax.tree_util.tree_structure(trained))
    _assert_resumes_like(straight, config, tmp_path / "resumed", monkeypatch, [3, 5, 7, 8])

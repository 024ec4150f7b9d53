"""The study in miniature (experiments/study.py, study_report.py, configs/study_mini.py).

Fast tests check the plan (which stages, in which order, joined by which
paths), the skip-what-is-done record, the pretraining corpus and the report
built from constructed run files: every number it prints is one of theirs,
and each finding's verdict follows the numbers. The slow ones run a
shrunken default job end to end, and kill it with SIGKILL mid-stage and
rerun it, and compare the reports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import chex
import numpy as np
import pytest

import subprocess_runs
from configs import study as study_full
from configs import study_mini
from rl_reason.data import synthetic
from rl_reason.experiments import runs, sft, study, study_plan, study_report, tasks


# --- the plan -------------------------------------------------------------------


def test_the_default_plan_runs_the_starts_the_orm_and_each_rl_run_followed_by_its_evaluation():
    config = study_mini.get_config()
    plan = study_plan.stages(config, "/w")
    names = [s.name for s in plan]
    assert names[:5] == ["pretrain", "sft", "orm", "eval-pretrained", "eval-sft"]
    runs_ = [study_plan.parse_run(spec) for spec in config.study.runs]
    assert names[5:] == [
        name for s, a, r in runs_ for name in (f"{s}-{a}-{r}", f"eval-{s}-{a}-{r}")
    ]
    by_name = {s.name: s for s in plan}
    assert "model_source" not in by_name["pretrain"].config  # trained from scratch
    assert by_name["pretrain"].config.data.task == "synthetic_text"
    assert by_name["sft"].config.model_source.path == "/w/pretrain"
    assert by_name["orm"].config.model_source.path == "/w/sft"
    assert by_name["sft-ppo-sparse"].config.model_source.path == "/w/sft"
    assert by_name["pretrained-ei-sparse"].config.model_source.path == "/w/pretrain"
    for stage in plan:
        if stage.kind == "evaluate":
            assert stage.config.model_source.path == f"/w/{stage.model_stage}"
            assert stage.config.eval.orm_source == "/w/orm"
            assert tuple(stage.config.eval.ks) == (1, 2, 4, 8, 16)
    # Both stages' K: the table's column is the evaluation's.
    assert study_report.num_samples(config) == 16


def test_reward_variants_and_seeds_change_only_what_they_name():
    config = study_mini.get_config()
    config.study.runs = ("sft:ppo:sparse", "sft:ppo:dense", "sft:rcrl:dense", "sft:grpo:sparse")
    config.study.seeds = (0, 3)
    plan = {s.name: s for s in study_plan.stages(config, "/w")}
    sparse, dense = plan["sft-ppo-sparse-seed0"].config, plan["sft-ppo-dense-seed0"].config
    assert dict(sparse.rl.rewards) == {"correctness": 1.0}
    assert dict(dense.rl.rewards) == dict(config.study.dense_rewards)
    dense.rl.rewards = sparse.rl.rewards
    assert runs.config_dict(dense) == runs.config_dict(sparse)  # nothing else differs
    assert plan["sft-rcrl-dense-seed3"].config.rcrl.mode == "dense"
    assert plan["sft-rcrl-dense-seed3"].config.seed == 3
    grpo = plan["sft-grpo-sparse-seed0"].config
    assert (grpo.algorithm, grpo.rl.advantage, grpo.ppo.use_value) == ("grpo", "grpo", False)
    # The templates themselves are untouched.
    assert config.stages.ppo.model_source.path == "" and config.stages.ppo.seed == 0
    # The starts are evaluated once, whatever the seeds.
    assert [n for n in plan if n.startswith("eval-") and n.count("-") == 1] == [
        "eval-pretrained",
        "eval-sft",
    ]


def test_the_full_grid_runs_every_start_algorithm_and_reward_three_times_with_k_96():
    config = study_full.get_config()
    plan = study_plan.stages(config, "/w")
    trained = [s for s in plan if s.kind == "train" and s.name not in ("pretrain", "sft", "orm")]
    assert len(trained) == 2 * 6 * 3
    assert {(s.config.algorithm, s.config.seed) for s in trained} == {
        (a, seed) for a in ("ei", "ppo", "rcrl") for seed in (0, 1, 2)
    }
    orm_runs = [s.config for s in trained if s.name.split("-")[2] == "orm"]
    assert len(orm_runs) == 6
    assert all(dict(c.rl.rewards) == {"orm_outcome": 1.0} for c in orm_runs)
    assert all(c.rl.orm_source == "/w/orm" for c in orm_runs)
    assert study_report.num_samples(config) == 96 and config.stages.ei.ei.num_samples == 96


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sft:ei", "is not 'start:algorithm:reward'"),
        ("base:ei:sparse", "start 'base'"),
        ("sft:dpo:sparse", "algorithm 'dpo'"),
        ("sft:ei:dense", "ei has the rewards"),
    ],
)
def test_a_wrong_run_spec_is_named(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        study_plan.parse_run(spec)


def test_a_stage_is_skipped_only_when_it_finished_under_the_config_it_has_now(tmp_path):
    stage = study_plan.stages(study_mini.get_config(), str(tmp_path))[1]
    assert study.stage_record(str(tmp_path), stage) is None
    (tmp_path / stage.name).mkdir()
    record = {"config": runs.config_dict(stage.config), "metrics": {"loss": 0.5}}
    (tmp_path / stage.name / study.STAGE_RECORD).write_text(json.dumps(record))
    assert study.stage_record(str(tmp_path), stage) == record
    stage.config.train.num_steps += 1
    assert study.stage_record(str(tmp_path), stage) is None


# --- the pretraining corpus -------------------------------------------------------


def test_the_pretraining_corpus_is_arithmetic_text_but_never_the_tasks_solutions():
    corpus = synthetic.pretraining_corpus(600, seed=1)
    assert corpus == synthetic.pretraining_corpus(600, seed=1)
    assert corpus != synthetic.pretraining_corpus(600, seed=2)
    solutions = {ex["answer"] for ex in synthetic.generate("train", 3000, seed=1)}
    kinds = {"story": 0, "drill": 0, "answer_key": 0, "worked_key": 0}
    for document in corpus:
        assert document not in solutions and document.count("####") <= 1
        if document.startswith("Question: "):
            question, answer = document.split("\nAnswer: ")
            assert synthetic.split_of(question[len("Question: ") :]) == "train"
            # a bare answer, or a one-line working: never one step a line
            if answer.startswith("#### "):
                kinds["answer_key"] += 1
            else:
                kinds["worked_key"] += 1
                assert answer.startswith("First ") and answer.count("\n") == 1
        elif " has " in document:
            kinds["story"] += 1
            assert "Now " in document and "####" not in document
        else:
            kinds["drill"] += 1
            assert re.fullmatch(r"(\d+[-+*/]\d+=<<\d+[-+*/]\d+=\d+>>\d+, )*[^,]+\.", document)
    shares = {k: v / len(corpus) for k, v in kinds.items()}
    for kind, weight in synthetic.PRETRAINING_MIX:
        assert abs(shares[kind] - weight) < 0.07, shares


def test_pretraining_trains_on_every_token_of_a_document(tmp_path):
    config = study_mini.get_config().stages.pretrain
    config.data.update(num_train=8, num_eval=4, tokenizer_vocab_size=300)
    task = tasks.load(config)
    assert len(task.train) == 8 and len(task.heldout) == 4
    assert all(set(ex) == {"text"} for ex in task.train)
    data = sft.prepare_data(config, str(tmp_path))
    mask, inputs = data.train["loss_mask"], data.train["input_mask"]
    # Everything after BOS is target (the document and its EOS), nothing of the padding.
    np.testing.assert_array_equal(mask[:, 1:], inputs[:, 1:])
    assert not mask[:, 0].any()


# --- the report ---------------------------------------------------------------


def _fake_runs(tmp_path: Path, config, maj1: dict[str, float], pass16: dict[str, float]):
    """Constructed files for every stage of `config`'s plan: eval_metrics.json of the
    evaluations (maj@1 and pass@16 as given per evaluated stage, the rest derived)
    and metrics.jsonl of the RL runs (samples drawn, a held-out curve, reward/KL)."""
    plan = study_plan.stages(config, str(tmp_path))
    for index, stage in enumerate(plan):
        directory = tmp_path / stage.name
        directory.mkdir(parents=True, exist_ok=True)
        if stage.kind == "evaluate":
            m, p = maj1[stage.model_stage], pass16[stage.model_stage]
            metrics = {"maj@1": m, "num_questions": 128, "distinct_answers": 2.0 + index / 100}
            for k in (1, 2, 4, 8, 16):
                metrics[f"pass@{k}"] = metrics[f"pass@{k}_unbiased"] = m + (p - m) * k / 16
                metrics[f"rerank@{k}"] = m + 0.002 * k
                if k > 1:
                    metrics[f"maj@{k}"] = m + 0.001 * k
            (directory / "eval_metrics.json").write_text(json.dumps(metrics))
        elif stage.name not in ("pretrain", "sft", "orm"):
            lines = [
                {"step": 0, "heldout/maj@1": 0.5, "samples_drawn": 0},
                {"step": 1, "reward_mean": 0.5, "kl_k1": 0.01, "samples_drawn": 256},
                {"step": 2, "heldout/maj@1": 0.6, "samples_drawn": 1000 + index},
            ]
            (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return plan


_AGREEING = {
    "pretrain": 0.20, "sft": 0.60, "sft-ei-sparse": 0.70, "sft-ppo-sparse": 0.69,
    "sft-ppo-dense": 0.68, "sft-rcrl-sparse": 0.61, "pretrained-ei-sparse": 0.50,
    "pretrained-ppo-sparse": 0.45,
}  # fmt: skip


def test_the_report_prints_only_numbers_of_the_run_files_and_says_when_the_run_agrees(tmp_path):
    config = study_mini.get_config()
    pass16 = {name: min(m + 0.2, 0.95) for name, m in _AGREEING.items()}
    pass16.update({"pretrain": 0.60, "sft": 0.85})  # RL raises pass@16 by less than maj@1
    plan = _fake_runs(tmp_path, config, _AGREEING, pass16)
    rows = study_report.write_report(config, str(tmp_path), plan)
    report = (tmp_path / "report.md").read_text()

    # The table: one row per (start, algorithm, reward), its cells the files' numbers.
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0].split(" | ")[3:7] == ["maj@1", "maj@16", "rerank@16", "pass@16"]
    assert len(table) == 1 + 2 + len(config.study.runs)
    for line, (row, _) in zip(table[1:], rows):
        stage = next(s for s in plan if s.row == row)
        metrics = json.loads((tmp_path / stage.name / "eval_metrics.json").read_text())
        drawn = 0
        if row.algorithm:
            records = (tmp_path / stage.model_stage / "metrics.jsonl").read_text().splitlines()
            drawn = json.loads(records[-1])["samples_drawn"]
        cells = [c.strip() for c in line.strip("| ").split("|")]
        expected = [f"{100 * metrics[k]:.1f}" for k in ("maj@1", "maj@16", "rerank@16", "pass@16")]
        assert cells[3:7] == expected
        assert cells[7] == f"{metrics['distinct_answers']:.2f}" and cells[8] == f"{drawn:,}"
    saved = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert [r["metrics"]["maj@1"] for r in saved] == [m["maj@1"] for _, m in rows]

    # Every finding of the study, each agreeing here, with the numbers it rests on.
    for title in (
        "Expert Iteration is competitive with PPO",
        "RL shrinks the gap between the pretrained and the SFT start",
        "Dense rewards do not improve the final score",
        "pass@16 saturates early while maj@1 rises",
    ):
        paragraph = next(p for p in report.split("\n\n") if p.startswith(f"**{title}.**"))
        assert "This run agrees" in paragraph, paragraph
    assert "40.0 points of maj@1 (60.0% against 20.0%)" in report
    assert "after EI the SFT start's run leads by 20.0 points (70.0% against 50.0%)" in report
    for name in study_report.PLOTS.values():
        assert (tmp_path / name).stat().st_size > 1000 and f"]({name})" in report
    assert study_report.terminal_table(rows, config).splitlines()[0].split()[:3] == [
        "start",
        "algorithm",
        "reward",
    ]


def test_each_finding_says_when_the_run_disagrees(tmp_path):
    config = study_mini.get_config()
    disagreeing = dict(_AGREEING)
    disagreeing.update(
        {"sft-ei-sparse": 0.55, "sft-ppo-dense": 0.80, "pretrained-ei-sparse": 0.10,
         "pretrained-ppo-sparse": 0.10}
    )  # fmt: skip
    pass16 = {name: m + 0.3 for name, m in disagreeing.items()}
    pass16.update({"pretrain": 0.0, "sft": 0.1})  # pass@16 rises more than maj@1
    plan = _fake_runs(tmp_path, config, disagreeing, pass16)
    rows = study_report.collect(str(tmp_path), plan)
    verdicts = dict(study_report.findings(rows, config))
    for title, text in verdicts.items():
        assert text.startswith("This run does not agree"), (title, text)
    assert len(verdicts) == 4


def test_pass_at_k_rising_a_little_more_than_maj1_is_within_noise(tmp_path):
    """The saturation finding, as the others, is not decided by differences smaller than
    its noise: PPO's pass@16 rising 2 points more than its maj@1 still agrees."""
    config = study_mini.get_config()
    pass16 = {name: min(m + 0.2, 0.95) for name, m in _AGREEING.items()}
    pass16.update({"pretrain": 0.60, "sft": 0.85, "sft-ppo-sparse": 0.96})  # +11 vs maj@1's +9
    plan = _fake_runs(tmp_path, config, _AGREEING, pass16)
    verdicts = dict(study_report.findings(study_report.collect(str(tmp_path), plan), config))
    text = verdicts["pass@16 saturates early while maj@1 rises"]
    assert text.startswith("This run agrees"), text
    assert "sft / PPO / sparse: maj@1 +9.0, pass@16 +11.0 points (noise ±" in text


def test_seeds_are_shown_as_mean_and_standard_deviation():
    cell = study_report.cell([0.5, 0.6, 0.7])
    chex.assert_trees_all_close((cell.mean, cell.std, cell.n), (0.6, 0.1, 3))
    assert cell.percent() == "60.0 ± 10.0"
    assert study_report.cell([0.25]).percent() == "25.0"
    assert study_report.cell([1000, 3000]).count() == "2,000 ± 1,414"


# --- end to end -------------------------------------------------------------------


def tiny_study_config():
    """configs/study_mini.py shrunk to minutes on 8 virtual devices: every stage, tiny."""
    config = study_mini.get_config()
    s = config.stages
    s.pretrain.model.update(hidden_dim=32, num_layers=2, head_dim=8, mlp_dim=64, num_kv_heads=2)
    s.pretrain.data.update(num_train=256, num_eval=16, tokenizer_vocab_size=300)
    s.pretrain.train.update(batch_size=16, num_steps=10, log_every=5, eval_every=10)
    s.sft.data.update(num_train=64, num_eval=16)
    s.sft.train.update(batch_size=16, num_steps=10, log_every=5, eval_every=10)
    sampling = dict(max_new_tokens=12, sampling_batch_size=8, prompt_buckets=(128,))
    heldout = dict(num_examples=8, num_samples=2, max_new_tokens=12)
    s.orm.data.update(num_train=16, num_eval=8)
    s.orm.orm.update(num_samples=2, sampling_chunk=16, balance_questions=False, **sampling)
    s.orm.train.update(batch_size=8, num_steps=4, eval_every=4, log_every=2)
    s.orm.eval.update(**heldout)
    for name, section in (("ei", "ei"), ("rcrl", "rcrl")):
        s[name].data.update(num_train=16, num_validation=8, num_eval=8)
        s[name][section].update(
            num_rounds=1, num_samples=2, sampling_chunk=16, steps_per_round=4, eval_every=2,
            **sampling,
        )  # fmt: skip
        s[name].train.update(batch_size=8, log_every=2)
        s[name].eval.update(**heldout)
    s.ppo.data.update(num_train=16, num_eval=8)
    s.ppo.rl.update(num_iterations=2, prompts_per_iteration=8, num_samples=2, eval_every=2,
                    **sampling)  # fmt: skip
    s.ppo.eval.update(**heldout)
    s.eval.eval.update(num_examples=16, num_samples=4, ks=(1, 2, 4), max_new_tokens=12,
                       batch_size=8, prompt_buckets=(128,))  # fmt: skip
    for stage in s.values():
        stage.logging.tensorboard = False
        stage.checkpoint.async_save = False
    config.logging.progress_bar = False
    return config


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d[\d,]*\.?\d*", text)


@pytest.mark.slow
def test_the_shrunken_default_job_end_to_end_and_killed_mid_stage_ends_with_the_same_report(
    tmp_path,
):
    """The default job's stages, tiny, through `launch/train.py`: the report's
    structure and its numbers against the stages' own files; then the same job
    SIGKILLed inside a training stage and inside an evaluation and rerun: the
    finished stages are not run again and the report is the same."""
    config = tiny_study_config()
    overrides = subprocess_runs.config_overrides(config, study_mini.get_config())
    command = lambda workdir: subprocess_runs.train_command(workdir, None, overrides)  # noqa: E731
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    done = subprocess_runs.run(command(straight))
    report = (straight / "report.md").read_text()
    plan = study_plan.stages(config, str(straight))
    assert f"[{len(plan)}/{len(plan)}] eval-pretrained-ppo-sparse" in done.stdout
    # The table, in the terminal.
    lines = done.stdout.splitlines()
    assert any(line.split()[:3] == ["start", "algorithm", "reward"] for line in lines)
    for stage in plan:
        assert (straight / stage.name / study.STAGE_RECORD).exists(), stage.name
    rows = json.loads((straight / "study.json").read_text())["rows"]
    assert len(rows) == 2 + len(config.study.runs)
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)
    for line, row in zip(table[1:], rows):
        stage = next(s for s in plan if s.kind == "evaluate" and s.row == study_plan.Row(**{
            k: row[k] for k in ("start", "algorithm", "reward", "seed")}))  # fmt: skip
        metrics = json.loads((straight / stage.name / "eval_metrics.json").read_text())
        timing = ("samples_drawn", *study_report.TIMING_KEYS)
        assert {k: v for k, v in metrics.items() if k not in timing} == {
            k: v for k, v in row["metrics"].items() if k not in timing
        }
        cells = [c.strip() for c in line.strip("| ").split("|")]
        assert cells[3:7] == [
            f"{100 * metrics[k]:.1f}" for k in ("maj@1", "maj@4", "rerank@4", "pass@4")
        ]
        records = subprocess_runs.records(straight / stage.model_stage)
        drawn = max((r.get("samples_drawn", 0) for r in records), default=0)
        assert cells[8] == f"{drawn if row['algorithm'] else 0:,}"
    for name in ("maj1_vs_samples.png", "pass_at_k.png", "ppo_reward_kl.png"):
        assert (straight / name).exists()

    # Killed inside EI's training from the SFT start and inside an evaluation, then rerun.
    subprocess_runs.kill_when(
        command(killed),
        lambda: bool(subprocess_runs.checkpoint_steps(killed / "sft-ei-sparse")),
        "an EI checkpoint",
        log=tmp_path / "killed.log",
    )
    assert not (killed / "sft-ei-sparse" / study.STAGE_RECORD).exists()
    subprocess_runs.kill_when(
        command(killed),
        lambda: (killed / "eval-sft-ppo-sparse" / "eval_progress").is_dir(),
        "an evaluation chunk",
        log=tmp_path / "killed.log",
    )
    again = subprocess_runs.run(command(killed))
    assert "pretrain: pretraining on arithmetic text: done before" in again.stdout
    assert (killed / "report.md").read_text() == report.replace(str(straight), str(killed))
    assert _numbers(report) and (killed / "study.json").read_text() == (
        straight / "study.json"
    ).read_text().replace(str(straight), str(killed))

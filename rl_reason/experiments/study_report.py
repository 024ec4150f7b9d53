"""The study's report: its table, a paragraph per finding, plots, all from the runs' own files.

Every number comes from a file a stage wrote: an evaluation's
`eval_metrics.json` (maj@1, maj@K, rerank@K, pass@k, diversity) and a
training run's `metrics.jsonl` (samples drawn, the held-out curve it logged
as it trained, PPO's reward and KL). `study.json` holds the rows as
collected, so a reader (or a test) can check the report against them.
Nothing in the report depends on wall time: a resumed job writes the same
report as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

import ml_collections

from rl_reason import checkpointing
from rl_reason import logging as run_logging
from rl_reason.experiments.study_plan import Row, Stage

# Evaluation metrics that measure the machine, not the model: left out of study.json,
# so that a resumed job's record equals an uninterrupted one's.
TIMING_KEYS = ("seconds", "tokens_per_second")
PLOTS = {
    "maj1_vs_samples": "maj1_vs_samples.png",
    "pass_at_k": "pass_at_k.png",
    "ppo_curves": "ppo_reward_kl.png",
}


@dataclasses.dataclass(frozen=True)
class Cell:
    """A metric over a row's seeds: mean, sample standard deviation, how many."""

    mean: float
    std: float
    n: int

    def percent(self) -> str:
        if self.n > 1:
            return f"{100 * self.mean:.1f} ± {100 * self.std:.1f}"
        return f"{100 * self.mean:.1f}"

    def count(self) -> str:
        if self.n > 1 and self.std:
            return f"{self.mean:,.0f} ± {self.std:,.0f}"
        return f"{self.mean:,.0f}"


def cell(values: Sequence[float]) -> Cell:
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Cell(statistics.fmean(values), std, len(values))


def num_samples(config: ml_collections.ConfigDict) -> int:
    return int(config.stages.eval.eval.num_samples)


def _samples_drawn(run_dir: str) -> int:
    drawn = [r["samples_drawn"] for r in run_logging.read_metrics(run_dir) if "samples_drawn" in r]
    return int(max(drawn, default=0))


def collect(workdir: str, plan: Sequence[Stage]) -> list[tuple[Row, dict[str, float]]]:
    """(row, metrics) for every evaluation stage: its eval_metrics.json, plus the
    samples its model's RL run drew (0 for a start model)."""
    rows = []
    for stage in plan:
        if stage.kind != "evaluate":
            continue
        with open(os.path.join(workdir, stage.name, "eval_metrics.json")) as f:
            metrics = json.load(f)
        drawn = 0
        if stage.row.algorithm:
            drawn = _samples_drawn(os.path.join(workdir, stage.model_stage))
        metrics = {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
        rows.append((stage.row, {**metrics, "samples_drawn": drawn}))
    return rows


def grouped(rows) -> dict[tuple[str, str, str], list[dict[str, float]]]:
    """Rows by (start, algorithm, reward), every seed's metrics together, in plan order."""
    groups: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for row, metrics in rows:
        groups.setdefault((row.start, row.algorithm, row.reward), []).append(metrics)
    return groups


def _columns(k: int, rerank: bool) -> list[tuple[str, str]]:
    columns = [("maj@1", "maj@1"), (f"maj@{k}", f"maj@{k}")]
    if rerank:
        columns.append((f"rerank@{k}", f"rerank@{k}"))
    columns += [(f"pass@{k}", f"pass@{k}"), ("distinct answers", "distinct_answers")]
    return columns


def table(rows, config: ml_collections.ConfigDict) -> list[str]:
    """The study's table as markdown lines: start x algorithm x reward, seeds as mean ± std."""
    k = num_samples(config)
    columns = _columns(k, bool(config.study.rerank))
    header = ["start", "algorithm", "reward", *[name for name, _ in columns], "samples drawn"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (start, algorithm, reward), runs in grouped(rows).items():
        cells = [start, algorithm.upper() or "--", reward or "--"]
        for name, key in columns:
            values = cell([m[key] for m in runs])
            cells.append(f"{values.mean:.2f}" if key == "distinct_answers" else values.percent())
        cells.append(cell([m["samples_drawn"] for m in runs]).count())
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def terminal_table(rows, config: ml_collections.ConfigDict) -> str:
    """The table as aligned text columns, for the terminal."""
    cells = [
        [c.strip() for c in line.strip("|").split("|")]
        for i, line in enumerate(table(rows, config))
        if i != 1
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)


def _mean(groups, key, metric) -> float | None:
    runs = groups.get(key)
    return cell([m[metric] for m in runs]).mean if runs else None


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _se(p: float, n: int) -> float:
    """The standard error of a held-out accuracy p on n questions."""
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def findings(rows, config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(title, paragraph) per finding of the study, each saying whether this run agrees.

    "Within noise" is two standard errors of the held-out maj@1 (binomial, on
    the evaluation's number of questions).
    """
    ctx = _Context(
        groups=grouped(rows),
        k=num_samples(config),
        n=int(rows[0][1]["num_questions"]) if rows else 0,
    )
    out = [finding(ctx) for finding in _FINDINGS]
    return [f for f in out if f is not None]


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every finding reads: the runs by (start, algorithm, reward), K and the
    number of held-out questions."""

    groups: dict
    k: int
    n: int

    def maj(self, key) -> float | None:
        return _mean(self.groups, key, "maj@1")

    def pass_k(self, key) -> float | None:
        return _mean(self.groups, key, f"pass@{self.k}")


def _verdict(verdicts: list[bool]) -> str:
    return "agrees" if all(verdicts) else "does not agree"


def _ei_competes_with_ppo(c: _Context) -> tuple[str, str] | None:
    parts, verdicts = [], []
    for start in ("sft", "pretrained"):
        ei, ppo = c.maj((start, "ei", "sparse")), c.maj((start, "ppo", "sparse"))
        if ei is None or ppo is None:
            continue
        tolerance = 2 * _se((ei + ppo) / 2, c.n)
        verdicts.append(ei >= ppo - tolerance)
        parts.append(
            f"from the {start} start EI reaches {_pct(ei)} maj@1 and PPO {_pct(ppo)}"
            f" ({100 * (ei - ppo):+.1f} points; noise ±{100 * tolerance:.1f})"
        )
    if not parts:
        return None
    return (
        "Expert Iteration is competitive with PPO",
        f"This run {_verdict(verdicts)}: {'; '.join(parts)}. EI counts as competitive when it is"
        " no more than two standard errors below PPO.",
    )


def _rl_shrinks_the_start_gap(c: _Context) -> tuple[str, str] | None:
    before_sft, before_pre = c.maj(("sft", "", "")), c.maj(("pretrained", "", ""))
    if before_sft is None or before_pre is None:
        return None
    parts, verdicts = [], []
    for algorithm in ("ei", "ppo", "grpo", "rcrl"):
        after_sft = c.maj(("sft", algorithm, "sparse"))
        after_pre = c.maj(("pretrained", algorithm, "sparse"))
        if after_sft is None or after_pre is None:
            continue
        gap = after_sft - after_pre
        verdicts.append(gap < before_sft - before_pre)
        parts.append(
            f"after {algorithm.upper()} the SFT start's run leads by {100 * gap:.1f} points"
            f" ({_pct(after_sft)} against {_pct(after_pre)})"
        )
    if not parts:
        return None
    return (
        "RL shrinks the gap between the pretrained and the SFT start",
        f"This run {_verdict(verdicts)}: before RL the SFT model leads the pretrained one by"
        f" {100 * (before_sft - before_pre):.1f} points of maj@1 ({_pct(before_sft)}"
        f" against {_pct(before_pre)}); {'; '.join(parts)}.",
    )


def _dense_rewards_do_not_help(c: _Context) -> tuple[str, str] | None:
    parts, verdicts = [], []
    for start, algorithm, reward in c.groups:
        if reward in ("", "sparse") or (start, algorithm, "sparse") not in c.groups:
            continue
        other, sparse = c.maj((start, algorithm, reward)), c.maj((start, algorithm, "sparse"))
        tolerance = 2 * _se((other + sparse) / 2, c.n)
        verdicts.append(other <= sparse + tolerance)
        parts.append(
            f"{algorithm.upper()} from the {start} start: {reward} {_pct(other)} against sparse"
            f" {_pct(sparse)} ({100 * (other - sparse):+.1f} points; noise ±{100 * tolerance:.1f})"
        )
    if not parts:
        return None
    return (
        "Dense rewards do not improve the final score",
        f"This run {_verdict(verdicts)}: {'; '.join(parts)}. A dense or ORM reward counts as an"
        " improvement when it beats its sparse twin by more than two standard errors.",
    )


def _pass_at_k_saturates(c: _Context) -> tuple[str, str] | None:
    parts, verdicts = [], []
    for start, algorithm, reward in c.groups:
        if not algorithm or (start, "", "") not in c.groups:
            continue
        maj, pass_k = c.maj((start, algorithm, reward)), c.pass_k((start, algorithm, reward))
        d_maj = maj - c.maj((start, "", ""))
        d_pass = pass_k - c.pass_k((start, "", ""))
        if d_maj <= 0:
            continue  # a run that did not raise maj@1 says nothing about this finding
        tolerance = 2 * _se((maj + pass_k) / 2, c.n)
        verdicts.append(d_pass <= d_maj + tolerance)
        parts.append(
            f"{start} / {algorithm.upper()} / {reward}: maj@1 {100 * d_maj:+.1f},"
            f" pass@{c.k} {100 * d_pass:+.1f} points (noise ±{100 * tolerance:.1f})"
        )
    if not parts:
        return None
    return (
        f"pass@{c.k} saturates early while maj@1 rises",
        f"This run {_verdict(verdicts)} ({sum(verdicts)} of {len(verdicts)} runs that raised"
        f" maj@1 raised pass@{c.k} by no more, within noise): {'; '.join(parts)}. pass@{c.k}"
        " counts as rising more when it gains more than maj@1 by over two standard errors."
        " RL mostly makes the model choose what it could already find among K samples, rather"
        " than find new solutions.",
    )


# The study's findings in the paper's order: EI ~ PPO; RL closes the SFT-vs-pretrained gap;
# dense rewards do not help; exploration stays within what the start could already sample.
_FINDINGS = (
    _ei_competes_with_ppo,
    _rl_shrinks_the_start_gap,
    _dense_rewards_do_not_help,
    _pass_at_k_saturates,
)


def _curves(workdir: str, plan: Sequence[Stage]):
    """Held-out maj@1 against samples drawn, per trained RL stage (the run's own evaluations)."""
    curves = {}
    for stage in plan:
        if stage.kind != "evaluate" or not stage.row.algorithm:
            continue
        records = run_logging.read_metrics(os.path.join(workdir, stage.model_stage))
        points = [
            (r["samples_drawn"], r["heldout/maj@1"])
            for r in records
            if "heldout/maj@1" in r and "samples_drawn" in r
        ]
        curves[stage.model_stage] = (stage.row, points)
    return curves


def _save(fig, axes, title: str, path: str) -> str:
    """Title on the first axes, its legend, a light grid on all; the PNG at `path`."""
    from matplotlib import pyplot as plt

    axes[0].set_title(title)
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.basename(path)


def plot(rows, config, workdir: str, plan: Sequence[Stage]) -> list[str]:
    """The report's PNG plots; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    colors = {"ei": "tab:blue", "ppo": "tab:orange", "grpo": "tab:green", "rcrl": "tab:red"}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (row, points) in _curves(workdir, plan).items():
        if points:
            xs, ys = zip(*points)
            ax.plot(
                xs,
                [100 * y for y in ys],
                linestyle="-" if row.start == "sft" else "--",
                marker="o" if row.reward == "sparse" else "s",
                label=name,
                color=colors[row.algorithm],
            )
    ax.set_xlabel("samples drawn (solid: from the SFT start, dashed: from the pretrained start)")
    ax.set_ylabel("held-out maj@1 (%), the run's own evaluations")
    title = "Held-out maj@1 against samples drawn"
    written.append(_save(fig, [ax], title, os.path.join(workdir, PLOTS["maj1_vs_samples"])))

    k = num_samples(config)
    ks = [j for j in range(1, k + 1) if f"pass@{j}_unbiased" in rows[0][1]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (start, algorithm, reward), runs in grouped(rows).items():
        ys = [100 * cell([m[f"pass@{j}_unbiased"] for m in runs]).mean for j in ks]
        start_row = not algorithm
        ax.plot(
            ks,
            ys,
            marker="o",
            label=f"{start} start" if start_row else f"{start} / {algorithm.upper()} / {reward}",
            linewidth=2.5 if start_row else 1,
            color="black" if start_row else colors[algorithm],
            linestyle="-" if start == "sft" else "--",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (solid: SFT start and its runs, dashed: pretrained)")
    ax.set_ylabel("held-out pass@k (%), unbiased")
    title = "pass@k before (thick) and after RL"
    written.append(_save(fig, [ax], title, os.path.join(workdir, PLOTS["pass_at_k"])))

    ppo_runs = [
        s for s in plan if s.kind == "train" and s.config.get("algorithm") in ("ppo", "grpo")
    ]
    if ppo_runs:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for stage in ppo_runs:
            records = run_logging.read_metrics(os.path.join(workdir, stage.name))
            steps = [r for r in records if "reward_mean" in r]
            xs = [r["step"] for r in steps]
            top.plot(xs, [r["reward_mean"] for r in steps], label=stage.name)
            bottom.plot(xs, [r.get("kl_k1", 0.0) for r in steps], label=stage.name)
        top.set_ylabel("mean reward")
        bottom.set_ylabel("KL to the start (k1)")
        bottom.set_xlabel("iteration")
        title = "PPO / GRPO: reward and KL per iteration"
        path = os.path.join(workdir, PLOTS["ppo_curves"])
        written.append(_save(fig, [top, bottom], title, path))
    return written


def _about(config: ml_collections.ConfigDict, rows) -> str:
    ev = config.stages.eval
    n = int(rows[0][1]["num_questions"]) if rows else 0
    seeds = tuple(config.study.seeds)
    rerank = ""
    if config.study.rerank:
        rerank = " rerank@K (by the ORM trained on the SFT model's samples),"
    return (
        f"The built-in synthetic arithmetic task; every model evaluated on the same {n}"
        f" held-out questions: maj@1 greedy, maj@K,{rerank} pass@K and the distinct final"
        f" answers among K={num_samples(config)} samples at temperature {ev.eval.temperature}."
        f" Samples drawn are those each RL run drew to train. Seeds:"
        f" {', '.join(map(str, seeds))}"
        + (" (cells are mean ± standard deviation over seeds)." if len(seeds) > 1 else ".")
    )


def write_report(config, workdir: str, plan: Sequence[Stage]):
    """report.md, its plots and study.json in `workdir`; returns the collected rows."""
    rows = collect(workdir, plan)
    written = plot(rows, config, workdir, plan)
    lines = ["# The study in miniature", "", _about(config, rows), "", *table(rows, config), ""]
    lines += ["## What this run says about the study's findings", ""]
    for title, text in findings(rows, config):
        lines += [f"**{title}.** {text}", ""]
    lines += ["## Plots", ""]
    lines += [f"![{name}]({name})" for name in written]
    lines += ["", "## Stages", ""]
    lines += [f"- `{s.name}/`: {s.description}" for s in plan]
    text = "\n".join(lines) + "\n"
    checkpointing.write_bytes_atomic(os.path.join(workdir, "report.md"), text.encode())
    checkpointing.write_json_atomic(
        os.path.join(workdir, "study.json"),
        {"rows": [{**dataclasses.asdict(row), "metrics": m} for row, m in rows]},
    )
    return rows


def _summary_keys(stage: Stage) -> tuple[str, ...]:
    """What the one-line status of a finished training stage shows."""
    algorithm = stage.config.get("algorithm", "sft")
    if algorithm == "sft":
        return ("eval_loss", "eval_token_accuracy")
    if algorithm == "orm":
        k = stage.config.eval.num_samples
        return ("heldout/auc", "heldout/within_question_auc", f"heldout/rerank@{k}",
                f"heldout/maj@{k}")  # fmt: skip
    return ("heldout/maj@1", "samples_drawn")  # the RL runs


def summary(stage: Stage, record: dict[str, Any]) -> str:
    """One line about a finished stage, for the terminal."""
    metrics = record.get("metrics") or {}
    if stage.kind == "evaluate":
        k = stage.config.eval.num_samples
        parts = [f"maj@1 {_pct(metrics.get('maj@1', 0.0))}"]
        for key in (f"maj@{k}", f"rerank@{k}", f"pass@{k}"):
            if key in metrics:
                parts.append(f"{key} {_pct(metrics[key])}")
        return ", ".join(parts)
    shown = {key: metrics[key] for key in _summary_keys(stage) if key in metrics}
    return ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) or "finished"


def log_to_wandb(config, workdir: str, rows) -> str:
    """The report in a W&B run of the study's workdir (`logging.backends` names
    "wandb"): the table, the plots and report.md (`run_logging.wandb_report`)."""
    cells = [
        [c.strip() for c in line.strip("|").split("|")]
        for i, line in enumerate(table(rows, config))
        if i != 1
    ]
    images = [os.path.join(workdir, name) for name in PLOTS.values()]
    return run_logging.wandb_report(
        workdir,
        config.logging.wandb.to_dict(),
        table=(cells[0], cells[1:]),
        images=[path for path in images if os.path.exists(path)],
        files=[os.path.join(workdir, "report.md")],
    )

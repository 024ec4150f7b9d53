"""Proves that two checkouts give the same numbers: every shipped algorithm config, shrunk.

For each case it runs a short version of a shipped config through `launch/train.py`
(or `launch/evaluate.py`) in the OLD and in the NEW checkout, each importing its own
`rl_reason`, every run from the same start model (the OLD side's SFT run), and
compares bitwise: `metrics.jsonl` record by record (time-like keys aside, listed in
the output), every array of the newest checkpoint's items and its progress record,
and the side files (EI/RCRL datasets, ORM datasets, eval_metrics.json,
eval_samples.jsonl; a study's stage list, stage records, study.json and report.md).
With --resume the NEW side also runs each case interrupted (its stop_after, or
SIGTERM at a file the case names) and resumed, and must equal its uninterrupted run;
with --upgrade the OLD side begins it, is interrupted, and the NEW side resumes it
from the OLD checkpoints: it must equal OLD's uninterrupted run (what a user who
upgrades mid-run gets).

    python tests/compare_runs.py --old /work/ref-old --new . --out /tmp/parity
    python tests/compare_runs.py --old /work/ref-old --new . --out /tmp/parity \
        --reuse-old --cases ppo,ei [--resume]

One line per case: PASS, or FAIL with the first difference. Exit status 1 on any FAIL.
Not collected by pytest (no test_ prefix): it takes minutes and needs two checkouts.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------
# The cases: a shipped config and the overrides that shrink it to seconds.
# "{sft}", "{sft_two_styles}", "{orm}", "{rcrl}" stand for the OLD side's run
# directory of that case: every side starts from the same model.

NO_LOGGING_EXTRAS = ["--config.logging.progress_bar=False", "--config.logging.tensorboard=False"]
TINY_MODEL = [  # the tests' 2-layer, 32-wide model on a 300-token vocabulary
    "--config.model.hidden_dim=32",
    "--config.model.num_layers=2",
    "--config.model.head_dim=8",
    "--config.model.mlp_dim=64",
    "--config.data.tokenizer_vocab_size=300",
]
# Six steps: the start answers nothing right, so every sparse reward is 0 (EI keeps
# all with threshold 0; RCRL labels all bad). A 300-step start at lr 3e-3 on 512
# questions answers ~11% of samples at 48 new tokens, but makes every case slower.
TINY_SFT = [
    *TINY_MODEL,
    "--config.data.num_train=64",
    "--config.data.num_eval=16",
    "--config.train.batch_size=16",
    "--config.train.num_steps=6",
    "--config.train.log_every=1",
    "--config.train.eval_every=3",
]
# A start that answers some questions right (greedy maj@1 ~19%, ~11% of samples at 48
# new tokens): the "*_strong" cases run the reward-driven paths (EI's selection,
# RCRL's good/bad labels, GRPO's non-zero group advantages) on real rewards.
STRONG_SFT = [
    *TINY_MODEL,
    "--config.data.num_train=512",
    "--config.data.num_eval=16",
    "--config.train.batch_size=16",
    "--config.train.num_steps=300",
    "--config.train.log_every=50",
    "--config.train.eval_every=300",
    "--config.optim.lr=3e-3",
]
STRONG_SAMPLING = ["num_samples=4", "max_new_tokens=48"]
TINY_HELDOUT = [  # the held-out evaluation an RL/EI/RCRL/ORM run logs
    "--config.eval.num_examples=8",
    "--config.eval.num_samples=2",
    "--config.eval.max_new_tokens=12",
]
TINY_ON_POLICY = [
    "--config.model_source.path={sft}",
    "--config.data.num_train=64",
    "--config.data.num_eval=16",
    "--config.rl.num_iterations=3",
    "--config.rl.prompts_per_iteration=8",
    "--config.rl.num_samples=2",
    "--config.rl.max_new_tokens=12",
    "--config.rl.sampling_batch_size=8",
    "--config.rl.eval_every=2",
    "--config.rl.prompt_buckets=(128,)",
    *TINY_HELDOUT,
]
TINY_ROUNDS = [  # EI and RCRL (`section` is ei or rcrl): 2 rounds of 3 sampling chunks
    "--config.data.num_train=24",
    "--config.data.num_validation=8",
    "--config.data.num_eval=8",
    "--config.{section}.num_rounds=2",
    "--config.{section}.num_samples=2",
    "--config.{section}.max_new_tokens=12",
    "--config.{section}.sampling_batch_size=8",
    "--config.{section}.sampling_chunk=8",
    "--config.{section}.steps_per_round=4",
    "--config.{section}.eval_every=2",
    "--config.{section}.prompt_buckets=(128,)",
    "--config.train.batch_size=8",
    "--config.train.log_every=1",
    *TINY_HELDOUT,
]
TINY_EVALUATION = [
    "--config.eval.max_new_tokens=12",
    "--config.eval.batch_size=8",
    "--config.eval.prompt_buckets=(128,)",
    "--config.eval.chunk_size=8",
]


def _rounds(section: str) -> list[str]:
    return [flag.replace("{section}", section) for flag in TINY_ROUNDS]


def _study_overrides() -> list[str]:
    """configs/study_mini.py's stages shrunk as tests/test_study.py's tiny_study_config."""
    s = "--config.stages"
    flags = [
        f"{s}.pretrain.model.hidden_dim=32",
        f"{s}.pretrain.model.num_layers=2",
        f"{s}.pretrain.model.head_dim=8",
        f"{s}.pretrain.model.mlp_dim=64",
        f"{s}.pretrain.data.num_train=256",
        f"{s}.pretrain.data.num_eval=16",
        f"{s}.pretrain.data.tokenizer_vocab_size=300",
        f"{s}.pretrain.train.batch_size=16",
        f"{s}.pretrain.train.num_steps=10",
        f"{s}.pretrain.train.log_every=5",
        f"{s}.pretrain.train.eval_every=10",
        f"{s}.sft.data.num_train=64",
        f"{s}.sft.data.num_eval=16",
        f"{s}.sft.train.batch_size=16",
        f"{s}.sft.train.num_steps=10",
        f"{s}.sft.train.log_every=5",
        f"{s}.sft.train.eval_every=10",
        f"{s}.orm.data.num_train=16",
        f"{s}.orm.data.num_eval=8",
        f"{s}.orm.orm.num_samples=2",
        f"{s}.orm.orm.sampling_chunk=16",
        f"{s}.orm.orm.balance_questions=False",
        f"{s}.orm.train.batch_size=8",
        f"{s}.orm.train.num_steps=4",
        f"{s}.orm.train.eval_every=4",
        f"{s}.orm.train.log_every=2",
        f"{s}.ppo.data.num_train=16",
        f"{s}.ppo.data.num_eval=8",
        f"{s}.ppo.rl.num_iterations=2",
        f"{s}.ppo.rl.prompts_per_iteration=8",
        f"{s}.ppo.rl.num_samples=2",
        f"{s}.ppo.rl.eval_every=2",
        f"{s}.eval.eval.num_examples=16",
        f"{s}.eval.eval.num_samples=4",
        f"{s}.eval.eval.ks=(1,2,4)",
        f"{s}.eval.eval.max_new_tokens=12",
        f"{s}.eval.eval.batch_size=8",
        f"{s}.eval.eval.prompt_buckets=(128,)",
    ]
    sampling = ["max_new_tokens=12", "sampling_batch_size=8", "prompt_buckets=(128,)"]
    flags += [f"{s}.orm.orm.{flag}" for flag in sampling]
    flags += [f"{s}.ppo.rl.{flag}" for flag in sampling]
    for name in ("ei", "rcrl"):
        flags += [f"{s}.{name}.{name}.{flag}" for flag in sampling]
        flags += [
            f"{s}.{name}.data.num_train=16",
            f"{s}.{name}.data.num_validation=8",
            f"{s}.{name}.data.num_eval=8",
            f"{s}.{name}.{name}.num_rounds=1",
            f"{s}.{name}.{name}.num_samples=2",
            f"{s}.{name}.{name}.sampling_chunk=16",
            f"{s}.{name}.{name}.steps_per_round=4",
            f"{s}.{name}.{name}.eval_every=2",
            f"{s}.{name}.train.batch_size=8",
            f"{s}.{name}.train.log_every=2",
        ]
    for name in ("orm", "ei", "rcrl", "ppo"):
        flags += [f"{s}.{name}.eval.{flag.removeprefix('--config.eval.')}" for flag in TINY_HELDOUT]
    for name in ("pretrain", "sft", "orm", "ei", "ppo", "rcrl", "eval"):
        flags.append(f"{s}.{name}.logging.tensorboard=False")
    flags.append("--config.logging.progress_bar=False")
    return flags


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: str  # file in the checkout's configs/
    overrides: list[str]
    starts: tuple[str, ...] = ()  # cases whose OLD run directory this one starts from
    launcher: str = "train.py"  # in the checkout's launch/
    # The resume pass stops the run early with this flag (as if preempted) or, without
    # one, SIGTERMs it once a file in its workdir matching `interrupt_at` has content.
    stop_flag: str = ""
    interrupt_at: str = "metrics.jsonl"
    logging_flags: bool = True  # the config has logging.progress_bar/tensorboard
    text_files: tuple[str, ...] = ()  # compared line by line too (files without wall times)


def _strong(section: str, flags: list[str]) -> list[str]:
    """`flags` from the strong start, with K=4 samples of 48 tokens in `section`."""
    flags = [
        f.replace("{sft}", "{sft_strong}").replace("{sft_two_styles}", "{sft_strong}")
        for f in flags
    ]
    return [*flags, *(f"--config.{section}.{flag}" for flag in STRONG_SAMPLING)]


CASES = [
    Case("sft", "arith_start.py", TINY_SFT, stop_flag="--config.train.stop_after=3"),
    Case(
        "sft_two_styles",  # RCRL's kind of start: half the solutions bare answers
        "arith_two_styles_start.py",
        TINY_SFT,
        stop_flag="--config.train.stop_after=3",
    ),
    Case("ppo", "arith_ppo.py", TINY_ON_POLICY, ("sft",), stop_flag="--config.rl.stop_after=1"),
    Case(
        "ppo_critic",  # a separate critic: a copy of the start with a value head
        "arith_ppo.py",
        [*TINY_ON_POLICY, "--config.critic.kind=start"],
        ("sft",),
        stop_flag="--config.rl.stop_after=1",
    ),
    Case("grpo", "arith_grpo.py", TINY_ON_POLICY, ("sft",), stop_flag="--config.rl.stop_after=1"),
    Case(
        "ei",  # threshold 0 keeps every sample: the tiny start answers nothing right
        "arith_ei.py",
        ["--config.model_source.path={sft}", *_rounds("ei"), "--config.ei.threshold=0.0"],
        ("sft",),
    ),
    Case(
        "rcrl",
        "arith_rcrl.py",
        ["--config.model_source.path={sft_two_styles}", *_rounds("rcrl")],
        ("sft_two_styles",),
    ),
    Case(
        "rcrl_dense",
        "arith_rcrl.py",
        [
            "--config.model_source.path={sft_two_styles}",
            *_rounds("rcrl"),
            "--config.rcrl.mode=dense",
        ],
        ("sft_two_styles",),
    ),
    Case(
        "orm",
        "arith_orm.py",
        [
            "--config.model_source.path={sft}",
            "--config.data.num_train=12",
            "--config.data.num_validation=4",
            "--config.data.num_eval=8",
            "--config.orm.num_samples=2",
            "--config.orm.max_new_tokens=12",
            "--config.orm.sampling_batch_size=8",
            "--config.orm.sampling_chunk=8",
            "--config.orm.prompt_buckets=(128,)",
            "--config.orm.score_batch_size=8",
            "--config.train.num_steps=4",
            "--config.train.batch_size=8",
            "--config.train.log_every=1",
            "--config.train.eval_every=2",
            *TINY_HELDOUT,
        ],
        ("sft",),
    ),
    Case(
        "eval",  # the SFT start, rerank@K by the ORM case's model
        "synthetic_eval.py",
        [
            "--config.model_source.path={sft}",
            "--config.eval.orm_source={orm}",
            "--config.eval.orm_length_buckets=(128,)",
            "--config.eval.num_examples=16",
            "--config.eval.num_samples=4",
            *TINY_EVALUATION,
        ],
        ("sft", "orm"),
        launcher="evaluate.py",
        interrupt_at="eval_progress/chunk_*",
    ),
    Case(
        "eval_rcrl",  # an RCRL model: prompts conditioned on its good token by itself
        "synthetic_eval.py",
        [
            "--config.model_source.path={rcrl}",
            "--config.eval.num_examples=8",
            "--config.eval.num_samples=2",
            *TINY_EVALUATION,
        ],
        ("rcrl",),
        launcher="evaluate.py",
        interrupt_at="eval_progress/chunk_*",
    ),
    Case(
        "study",
        "study_mini.py",
        _study_overrides(),
        logging_flags=False,
        text_files=("report.md",),
        interrupt_at="orm/metrics.jsonl",  # its fourth stage
    ),
    Case("sft_strong", "arith_start.py", STRONG_SFT),
    Case(
        "ei_strong",  # the shipped threshold: only correct samples are kept
        "arith_ei.py",
        _strong("ei", ["--config.model_source.path={sft}", *_rounds("ei")]),
        ("sft_strong",),
    ),
    Case(
        "rcrl_strong",
        "arith_rcrl.py",
        _strong("rcrl", ["--config.model_source.path={sft}", *_rounds("rcrl")]),
        ("sft_strong",),
    ),
    Case("grpo_strong", "arith_grpo.py", _strong("rl", TINY_ON_POLICY), ("sft_strong",)),
]
CASES_BY_NAME = {case.name: case for case in CASES}

# ----------------------------------------------------------------------------------
# What is compared.

# Keys whose values are wall times or rates over them: never compared.
TIME_KEY = re.compile(r"(^|[_/])(seconds|time|wall_time)$|per_second$")
# Side files compared (fnmatch on the path inside the run directory; `*` crosses "/").
SIDE_FILES = (
    "eval_metrics.json",
    "*/eval_metrics.json",
    "eval_samples.jsonl",
    "*/eval_samples.jsonl",
    "*dataset_round_*.jsonl",  # EI's and RCRL's datasets
    "orm/*.jsonl",  # the ORM's train/validation/held-out samples (not its chunk files)
    "*/orm/*.jsonl",
    "stage.json",  # a study stage's record: its "metrics" compared (its config has paths)
    "*/stage.json",
    "study.json",
)
NOT_SIDE_FILES = (
    "*chunk_*",  # a sampling store's chunks: how it stores them may change
    "metrics.jsonl",  # compared above
    "*/metrics.jsonl",
)
ignored_keys_seen: set[str] = set()


class Difference(Exception):
    """The first difference between two runs: where, and the two values."""


def _bits_equal(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return type(a) is type(b) and a == b


def compare_values(old, new, where: str) -> None:
    """Raises Difference at the first place `old` and `new` (parsed JSON) differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if TIME_KEY.search(str(key)):
                ignored_keys_seen.add(str(key))
                continue
            if key not in new or key not in old:
                side = "new" if key not in new else "old"
                raise Difference(f"{where}: key {key!r} missing on the {side} side")
            compare_values(old[key], new[key], f"{where}[{key!r}]")
    elif isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            raise Difference(f"{where}: {len(old)} items old, {len(new)} new")
        for i, (a, b) in enumerate(zip(old, new)):
            compare_values(a, b, f"{where}[{i}]")
    elif not _bits_equal(old, new):
        raise Difference(f"{where}: old {old!r}, new {new!r}")


def _read_json_lines(path: Path, workdir: Path) -> list:
    text = path.read_text().replace(str(workdir), "<workdir>")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def compare_json_file(old: Path, new: Path, old_dir: Path, new_dir: Path, label: str) -> None:
    if old.read_bytes() == new.read_bytes():
        return
    if old.suffix == ".jsonl":
        a, b = _read_json_lines(old, old_dir), _read_json_lines(new, new_dir)
        if len(a) != len(b):
            raise Difference(f"{label}: {len(a)} records old, {len(b)} new")
        for index, (x, y) in enumerate(zip(a, b)):
            compare_values(x, y, f"{label} record {index}")
        return
    a = json.loads(old.read_text().replace(str(old_dir), "<workdir>"))
    b = json.loads(new.read_text().replace(str(new_dir), "<workdir>"))
    if old.name == "stage.json":  # its config names the study's workdir
        a, b = a.get("metrics"), b.get("metrics")
    compare_values(a, b, label)


def _checkpoint_dirs(run: Path) -> list[Path]:
    return sorted(p.relative_to(run) for p in run.rglob("checkpoints") if p.is_dir())


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _restore_numpy(item: Path):
    """A checkpoint item's arrays as numpy, with no restore target (no rl_reason)."""
    import jax
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)  # "no _CHECKPOINT_METADATA": an item alone
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(item)
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None) or metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(item, restore_args=restore_args)
    return {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]
    }


def compare_arrays(old: dict, new: dict, label: str) -> int:
    """Every leaf bitwise; returns how many were compared."""
    if set(old) != set(new):
        only_old, only_new = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        raise Difference(f"{label}: leaves only old {only_old[:3]}, only new {only_new[:3]}")
    for path in sorted(old):
        a, b = np.asarray(old[path]), np.asarray(new[path])
        if a.dtype != b.dtype or a.shape != b.shape:
            raise Difference(f"{label}{path}: old {a.dtype}{a.shape}, new {b.dtype}{b.shape}")
        if a.tobytes() != b.tobytes():
            flat_a, flat_b = a.reshape(-1), b.reshape(-1)
            raw_a = flat_a.view(np.uint8).reshape(flat_a.size, -1)
            raw_b = flat_b.view(np.uint8).reshape(flat_b.size, -1)
            i = int(np.nonzero((raw_a != raw_b).any(axis=1))[0][0])
            index = [int(j) for j in np.unravel_index(i, a.shape)] if a.shape else []
            raise Difference(
                f"{label}{path}{index}: old {flat_a[i].item()!r}, new {flat_b[i].item()!r}"
                f" ({int((raw_a != raw_b).any(axis=1).sum())} of {a.size} elements differ)"
            )
    return len(old)


def compare_checkpoints(old_run: Path, new_run: Path, same_steps: bool) -> str:
    """The newest checkpoint of every checkpoints/ directory: each item's arrays, and
    the JSON items (progress, integrity). `same_steps`: also the list of steps kept."""
    dirs = _checkpoint_dirs(old_run)
    if dirs != _checkpoint_dirs(new_run):
        raise Difference(f"checkpoint directories: old {dirs}, new {_checkpoint_dirs(new_run)}")
    leaves = 0
    for relative in dirs:
        old_steps, new_steps = _steps(old_run / relative), _steps(new_run / relative)
        if not old_steps or not new_steps:
            raise Difference(f"{relative}: steps old {old_steps}, new {new_steps}")
        if old_steps[-1] != new_steps[-1] or (same_steps and old_steps != new_steps):
            raise Difference(f"{relative}: steps old {old_steps}, new {new_steps}")
        step = old_steps[-1]
        old_step, new_step = old_run / relative / str(step), new_run / relative / str(step)
        items = sorted(p.name for p in old_step.iterdir() if p.is_dir())
        if items != sorted(p.name for p in new_step.iterdir() if p.is_dir()):
            new_items = sorted(p.name for p in new_step.iterdir() if p.is_dir())
            raise Difference(f"{relative}/{step}: items old {items}, new {new_items}")
        arrays_first = sorted(items, key=lambda name: not (old_step / name / "_METADATA").exists())
        for item in arrays_first:
            label = f"{relative}/{step}/{item}"
            if (old_step / item / "_METADATA").exists():  # a pytree of arrays
                old_arrays = _restore_numpy(old_step / item)
                leaves += compare_arrays(old_arrays, _restore_numpy(new_step / item), label)
            elif item == "progress":
                compare_values(
                    _progress(old_step / item / "metadata", old_run),
                    _progress(new_step / item / "metadata", new_run),
                    label,
                )
            elif item == "integrity":  # its checksums' algorithm is the checkpoint format's
                compare_integrity(old_step / item / "metadata", new_step / item / "metadata", label)
            else:  # a JSON item (progress)
                compare_json_file(
                    old_step / item / "metadata", new_step / item / "metadata",
                    old_run, new_run, label,
                )  # fmt: skip
    return f"{len(dirs)} checkpoint dir(s), {leaves} arrays"


# Settings that later issues added to the model config (attention kernel and blocks,
# the float32 output head) at their defaults: the model the progress records is the
# same. And the start/reference models' fingerprints, which hash the parameters with
# the checkpoint format's checksum (issue 31 changed it): the parameters of every
# run are compared bit for bit, so the fingerprints are not.
ADDED_MODEL_SETTINGS = {
    "attention": "auto",
    "attention_block_q": 0,
    "attention_block_k": 0,
    "lm_head_fp32": False,
}
FINGERPRINT_KEYS = {"initial", "init", "reference"}


def _progress(path: Path, run: Path) -> dict:
    progress = json.loads(path.read_text().replace(str(run), "<workdir>"))
    for key in FINGERPRINT_KEYS & set(progress):
        progress[key] = "<fingerprint>"
    for model in progress.get("models", {}).values():
        for key, default in ADDED_MODEL_SETTINGS.items():
            if model.get(key, default) == default:
                model.pop(key, None)
    return progress


# What an integrity record holds besides each array's layout: its checksums, which
# depend on the format's algorithm (issue 31 changed it; the arrays are compared
# bit for bit above, so the layout is what is left to compare here).
CHECKSUM_KEYS = {"checksum", "checksums", "format", "algorithm"}


def compare_integrity(old: Path, new: Path, label: str) -> None:
    def layout(value):
        if isinstance(value, dict):
            return {k: layout(v) for k, v in value.items() if k not in CHECKSUM_KEYS}
        if isinstance(value, list):
            return [layout(v) for v in value]
        return value

    a, b = (layout(json.loads(path.read_text())) for path in (old, new))
    if a != b:
        raise Difference(f"{label}: the arrays' layout differs: old {a}, new {b}")


def _side_files(run: Path) -> list[str]:
    names = []
    for path in run.rglob("*"):
        relative = str(path.relative_to(run))
        if not path.is_file() or "checkpoints" in path.parts:
            continue
        if any(fnmatch.fnmatch(relative, p) for p in NOT_SIDE_FILES):
            continue
        if any(fnmatch.fnmatch(relative, p) for p in SIDE_FILES):
            names.append(relative)
    return sorted(names)


def compare_text_file(old: Path, new: Path, old_dir: Path, new_dir: Path, label: str) -> None:
    a = old.read_text().replace(str(old_dir), "<workdir>").splitlines()
    b = new.read_text().replace(str(new_dir), "<workdir>").splitlines()
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            raise Difference(f"{label} line {index + 1}: old {x!r}, new {y!r}")
    if len(a) != len(b):
        raise Difference(f"{label}: {len(a)} lines old, {len(b)} new")


def compare_runs(
    old_run: Path, new_run: Path, same_steps: bool = True, text_files: tuple[str, ...] = ()
) -> str:
    """Raises Difference at the first difference; else returns what was compared."""
    metrics = sorted(str(p.relative_to(old_run)) for p in old_run.rglob("metrics.jsonl"))
    new_metrics = sorted(str(p.relative_to(new_run)) for p in new_run.rglob("metrics.jsonl"))
    if metrics != new_metrics:
        raise Difference(f"metrics.jsonl files: old {metrics}, new {new_metrics}")
    records = 0
    for relative in metrics:
        old_records = _read_json_lines(old_run / relative, old_run)
        new_records = _read_json_lines(new_run / relative, new_run)
        records += len(old_records)
        if len(old_records) != len(new_records):
            raise Difference(f"{relative}: {len(old_records)} records old, {len(new_records)} new")
        for index, (a, b) in enumerate(zip(old_records, new_records)):
            compare_values(a, b, f"{relative} record {index} (step {a.get('step')})")
    side = _side_files(old_run)
    if side != _side_files(new_run):
        only_old = sorted(set(side) - set(_side_files(new_run)))
        only_new = sorted(set(_side_files(new_run)) - set(side))
        raise Difference(f"side files only old {only_old}, only new {only_new}")
    for relative in side:
        compare_json_file(old_run / relative, new_run / relative, old_run, new_run, relative)
    for relative in text_files:
        if not (old_run / relative).exists() or not (new_run / relative).exists():
            raise Difference(f"{relative}: missing on a side")
        compare_text_file(old_run / relative, new_run / relative, old_run, new_run, relative)
        side.append(relative)
    what = compare_checkpoints(old_run, new_run, same_steps)
    return f"{records} records in {len(metrics)} metrics.jsonl, {len(side)} side files, {what}"


# "[3/16] orm: the outcome reward model on ... ..." and "[3/16] orm: ...: done in 9 s; ..."
STAGE_LINE = re.compile(r"^\[(\d+)/(\d+)\] ([^:]+): (.*?)(?: \.\.\.$|: done)")


def stage_list(log: Path) -> list[tuple[str, ...]]:
    """The study's stages as its last run in `log` printed them: (i, n, name, what)."""
    last_run = log.read_text(errors="replace").split("\n$ ")[-1]
    seen = {}
    for line in last_run.splitlines():
        match = STAGE_LINE.match(line)
        if match:
            seen[match.group(1)] = tuple(g.strip() for g in match.groups())
    return list(seen.values())


def compare_stage_lists(old_log: Path, new_log: Path) -> str:
    """The study plans' stage lists (order, names, descriptions), as the runs printed them."""
    old, new = stage_list(old_log), stage_list(new_log)
    for a, b in zip(old, new):
        if a != b:
            raise Difference(f"study stage list: old {a}, new {b}")
    if len(old) != len(new) or not old:
        raise Difference(f"study stage list: {len(old)} stages old, {len(new)} new")
    return f"the same {len(old)} stages in the same order"


# ----------------------------------------------------------------------------------
# Running the cases.


def subprocess_environment(checkout: Path, cache: Path) -> dict[str, str]:
    """8 virtual CPU devices (as the tests), this checkout's rl_reason first on the
    path, and one persistent compilation cache for every run of both sides."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(checkout),
        XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_COMPILATION_CACHE_MAX_SIZE=str(64 << 30),
    )
    return env


def command(case: Case, checkout: Path, workdir: Path, start_dirs: dict[str, Path]) -> list[str]:
    overrides = [
        flag.format(**{k: str(v) for k, v in start_dirs.items()}) for flag in case.overrides
    ]
    if case.logging_flags:
        overrides += NO_LOGGING_EXTRAS
    return [
        sys.executable,
        str(checkout / "launch" / case.launcher),
        f"--config={checkout / 'configs' / case.config}",
        f"--workdir={workdir}",
        *overrides,
    ]


PREEMPTED_EXIT_CODE = 75  # rl_reason.checkpointing's: saved on SIGTERM, rerun to resume


class RunFailed(Exception):
    """A run exited with an error: the comparison cannot be made."""


def _has_content(workdir: Path, pattern: str) -> bool:
    return any(p.is_file() and p.stat().st_size > 0 for p in workdir.glob(pattern))


def run(cmd: list[str], env: dict, log: Path, interrupt: tuple[Path, str] | None = None) -> int:
    """Runs `cmd` to its end (output appended to `log`); returns its exit status.
    With `interrupt` (workdir, glob), SIGTERMs it as soon as a file matching the glob
    in the workdir has content (a preemption: a run saves and exits 75)."""
    with open(log, "ab") as out:
        out.write(("\n$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
        try:
            if interrupt is not None:
                while proc.poll() is None:
                    if _has_content(*interrupt):
                        proc.send_signal(signal.SIGTERM)
                        break
                    time.sleep(0.05)
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_case(case, checkout, workdir, start_dirs, env, log) -> float:
    """One complete run in a fresh workdir; returns its seconds."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    status = run(command(case, checkout, workdir, start_dirs), env, log)
    if status != 0:
        raise RunFailed(f"{checkout} exited {status}; see {log}: {_tail(log)}")
    return time.perf_counter() - began


def run_interrupted_then_resumed(
    case, checkout, workdir, start_dirs, env, log, first: tuple | None = None
) -> str:
    """The run stopped early (its stop flag, or SIGTERM), then the plain command again.
    `first`: (checkout, env) that runs the interrupted part, when not `checkout` (an
    upgrade: a run begun by the old code, resumed by the new)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    plain = command(case, checkout, workdir, start_dirs)
    first_plain, first_env = plain, env
    if first is not None:
        first_plain, first_env = command(case, first[0], workdir, start_dirs), first[1]
    if case.stop_flag:
        status, how = run([*first_plain, case.stop_flag], first_env, log), case.stop_flag
    else:
        status = run(first_plain, first_env, log, interrupt=(workdir, case.interrupt_at))
        how = f"SIGTERM at {case.interrupt_at}"
        how += " (finished before the signal)" if status == 0 else f" (exit {status})"
    if status not in (0, PREEMPTED_EXIT_CODE, -signal.SIGTERM):
        raise RunFailed(f"interrupted run exited {status}; see {log}: {_tail(log)}")
    status = run(plain, env, log)
    if status != 0:
        raise RunFailed(f"resumed run exited {status}; see {log}: {_tail(log)}")
    return how


def _tail(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-600:]


def _done_marker(out: Path, case: Case) -> Path:
    return out / "old" / f"{case.name}.done"


def ensure_old(case, args, env, out, log_dir, reuse: bool) -> float | None:
    """The OLD side's run of `case` (and of the starts it needs); None when reused."""
    for start in case.starts:
        ensure_old(CASES_BY_NAME[start], args, env, out, log_dir, reuse=True)
    if reuse and _done_marker(out, case).exists():
        return None
    _done_marker(out, case).unlink(missing_ok=True)
    seconds = run_case(case, args.old, out / "old" / case.name, start_dirs(out), env,
                       log_dir / f"old_{case.name}.log")  # fmt: skip
    _done_marker(out, case).write_text(f"{seconds:.1f} s\n")
    return seconds


def start_dirs(out: Path) -> dict[str, Path]:
    return {case.name: out / "old" / case.name for case in CASES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout before the change")
    parser.add_argument("--new", type=Path, required=True, help="checkout after the change")
    parser.add_argument("--out", type=Path, required=True, help="where the runs go")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES),
                        help=f"comma-separated, of {[c.name for c in CASES]}")  # fmt: skip
    parser.add_argument("--reuse-old", action="store_true",
                        help="keep the OLD side's finished runs in --out instead of rerunning")  # fmt: skip
    parser.add_argument("--upgrade", action="store_true",
                        help="also run each case begun by OLD, interrupted, resumed by NEW;"
                        " it must equal OLD's uninterrupted run")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="also run each case on the NEW side interrupted then resumed")  # fmt: skip
    args = parser.parse_args()
    args.old, args.new, args.out = args.old.resolve(), args.new.resolve(), args.out.resolve()
    wanted = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in CASES_BY_NAME]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {list(CASES_BY_NAME)}")
    out = args.out
    log_dir = out / "logs"
    for directory in (out / "old", out / "new", log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    cache = out / "jax_cache"
    old_env, new_env = (
        subprocess_environment(args.old, cache),
        subprocess_environment(args.new, cache),
    )
    print(f"old: {args.old}\nnew: {args.new}\nout: {out}", flush=True)

    failures = 0
    for case in [c for c in CASES if c.name in wanted]:  # in dependency order
        began = time.perf_counter()
        times, status = [], ""
        try:
            old_seconds = ensure_old(case, args, old_env, out, log_dir, reuse=args.reuse_old)
            times.append("old reused" if old_seconds is None else f"old {old_seconds:.0f} s")
            new_seconds = run_case(case, args.new, out / "new" / case.name, start_dirs(out),
                                   new_env, log_dir / f"new_{case.name}.log")  # fmt: skip
            times.append(f"new {new_seconds:.0f} s")
            compared = compare_runs(
                out / "old" / case.name, out / "new" / case.name, text_files=case.text_files
            )
            if case.name == "study":
                compared += "; " + compare_stage_lists(log_dir / "old_study.log",
                                                       log_dir / "new_study.log")  # fmt: skip
            status = f"PASS  {compared}"
            if args.resume:
                clock = time.perf_counter()
                resumed = out / "new_resumed" / case.name
                how = run_interrupted_then_resumed(case, args.new, resumed, start_dirs(out),
                                                   new_env, log_dir / f"resumed_{case.name}.log")  # fmt: skip
                times.append(f"resume {time.perf_counter() - clock:.0f} s")
                try:
                    compare_runs(out / "new" / case.name, resumed, False, case.text_files)
                    status += f"; resumed after {how} == uninterrupted"
                except Difference as e:
                    raise Difference(f"resumed after {how} != uninterrupted (new side): {e}")
            if args.upgrade and case.name != "study":
                clock = time.perf_counter()
                upgraded = out / "upgraded" / case.name
                how = run_interrupted_then_resumed(case, args.new, upgraded, start_dirs(out),
                                                   new_env, log_dir / f"upgraded_{case.name}.log",
                                                   first=(args.old, old_env))  # fmt: skip
                times.append(f"upgrade {time.perf_counter() - clock:.0f} s")
                try:
                    compare_runs(out / "old" / case.name, upgraded, False, case.text_files)
                    status += f"; begun by OLD, {how}, resumed by NEW == OLD uninterrupted"
                except Difference as e:
                    raise Difference(f"begun by OLD, resumed by NEW after {how} != OLD: {e}")
        except (Difference, RunFailed) as e:
            failures += 1
            status = f"FAIL  {e}"
        seconds = time.perf_counter() - began
        print(f"{case.name:15s} {status}  [{', '.join(times)}; {seconds:.0f} s]", flush=True)
    print(f"ignored (time-like) keys: {sorted(ignored_keys_seen) or 'none seen'}")
    print(f"{len(wanted) - failures} of {len(wanted)} cases PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's research-code example runs as written (examples/research_loop.py)."""

import importlib.util
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_research_loop_runs_an_sft_step_and_a_grpo_iteration():
    out = _load("research_loop").main(sft_steps=4, num_prompts=8, k=4)
    assert out["sft"]["finite"] == 1.0 and math.isfinite(float(out["sft"]["loss"]))
    grpo = out["grpo"]
    assert grpo["finite"] == 1.0
    # A single-step update takes its ratio against its own forward: exactly 1.
    assert abs(float(grpo["ratio_mean"]) - 1.0) < 1e-6
    assert float(grpo["lr"]) > 0 and float(grpo["grad_norm"]) >= 0
    assert len(out["texts"]) == 8 * 4

"""The README's research-code example runs as written (examples/research_loop.py)."""

import ast
import importlib.util
import inspect
import math
import pathlib
import re

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


def _readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def _dotted(node):
    """'a.b.c' for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def test_the_readme_excerpt_calls_the_example_s_functions_with_their_arguments():
    """Every library call of the README's excerpt names a function of the library,
    reached through the example's imports, with arguments its signature accepts
    (what went wrong in the README's earlier snippet); no JAX work."""
    (block,) = _readme_python_blocks()
    names = vars(_load("research_loop"))
    checked = 0
    for node in ast.walk(ast.parse(block)):
        if not isinstance(node, ast.Call) or (dotted := _dotted(node.func)) is None:
            continue
        head, *rest = dotted.split(".")
        if head not in names:
            continue  # a local of the excerpt (sft_step, update, score, ...)
        target = names[head]
        for attr in rest:
            target = getattr(target, attr)  # AttributeError: the README names nothing
        if not getattr(target, "__module__", "").startswith("rl_reason"):
            continue
        signature = inspect.signature(target)
        if isinstance(target, type):
            signature = inspect.signature(target.__init__)
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        signature.bind(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
        checked += 1
    assert checked >= 12, checked

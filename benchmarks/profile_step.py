"""Where the time of one SFT step goes, by HLO op category, beside PyTorch's step on the same shape.

    python benchmarks/profile_step.py                        # study_mini and llama_50m, both systems
    python benchmarks/profile_step.py --shape=study_mini --steps=5
    python benchmarks/profile_step.py --shape=llama_50m --skip-torch --top=40
    python benchmarks/profile_step.py --torch-threads=1      # PyTorch on one intra-op thread
    python benchmarks/profile_step.py --skip-jax --torch-threads=1 --shape=llama_50m

Ours: the jitted, donated `sft_step` built exactly as benchmarks/train_step.py
builds it (`ts.jit_step`, lowered through its `lower`), compiled once
here so that its optimized HLO can be read, warmed up, then run `--steps`
times under `jax.profiler.trace`. XLA:CPU's thunk executor records one
event per executed HLO instruction (thread pool lines of the host plane,
stat `hlo_op`); every instruction of the compiled module is classified
from the HLO text:

- kind: matmul (dot / a fusion holding a dot), reduction (reduce / a fusion
  holding one: softmax, norms, logsumexp, gradient sums), layout (copy,
  transpose, or a fusion of data movement only), stacking (the scans'
  dynamic-slice / dynamic-update-slice of per-layer and per-chunk values),
  elementwise (the other fusions), control (while / call / conditional:
  their own time, the children's excluded);
- phase, from the op_name JAX gives it: model forward (jvp(Transformer)),
  model backward (transpose(jvp(Transformer))), loss forward (the chunked
  unembedding and log-softmax, jvp()), loss backward, loss recomputation
  (the checkpointed chunk recomputed in the backward pass,
  `rematted_computation`), optimizer and metrics (everything after the
  gradient), other (the RNG split);
- source: the innermost rl_reason function of its stack frame (RMSNorm,
  apply_rope, dot_product_attention, ...).

Times are the events' durations summed over the pool's threads (CPU time of
the ops), per step; the wall time of a step is reported beside it. A dot's
FLOPs come from its shapes (2 x output size x contracted size), so each
matmul row shows its achieved GFLOP/s. An event's time is its own: events
nested in it on the same thread (a while loop's body; work the pool ran on
a thread waiting inside a plain `dot`) are subtracted, so a plain `dot`'s
GFLOP/s can read high; the ynn_fusion dots' do not nest.

PyTorch: the step of benchmarks/train_step.py (transformers' model, AdamW),
one warm-up, then `--steps` steps under torch.profiler (record_shapes), its
phases marked with record_function (forward, backward, clip, optimizer);
aten ops are classified by name into the same kinds, self CPU time, with
FLOPs of mm / addmm / bmm from the recorded shapes.

The timings move with the machine's load; read the shares.
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import shutil
import statistics
import tempfile
import time

import jax
from benchlib import load_average  # sets the path first
from train_step import SHAPES, build_torch, jax_step, make_batch

from rl_reason.parallel import sharding as shd

KINDS = ("matmul", "reduction", "elementwise", "layout", "stacking", "control", "other")
MOVEMENT = {
    "parameter", "constant", "bitcast", "reshape", "transpose", "copy", "broadcast", "slice",
    "concatenate", "pad", "tuple", "get-tuple-element", "reverse", "iota",
}  # fmt: skip
STACKING = {"dynamic-slice", "dynamic-update-slice"}
CONTROL = {"while", "call", "conditional"}


# --- the optimized HLO ----------------------------------------------------------------


def _shape_dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def _split_shape(rest: str) -> tuple[str, str]:
    """'f32[2]{0} add(...)' or '(s32[], f32[2]) while(...)' -> (shape, the remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 2 :]
    shape, _, tail = rest.partition(" ")
    return shape, tail


def parse_hlo(text: str) -> dict:
    """Computations -> instructions, and the stack frames' innermost functions."""
    computations: dict[str, list[dict]] = {}
    current = None
    files, functions, locations, frames = {}, {}, {}, {}
    section = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section and line and line[0].isdigit():
            key, _, value = line.partition(" ")
            if section == "FileNames":
                files[int(key)] = value.strip('"')
            elif section == "FunctionNames":
                functions[int(key)] = value.strip('"')
            elif section == "FileLocations":
                f = dict(re.findall(r"(\w+)=(\d+)", value))
                locations[int(key)] = (
                    int(f["file_name_id"]),
                    int(f["function_name_id"]),
                    int(f["line"]),
                )
            else:
                f = dict(re.findall(r"(\w+)=(\d+)", value))
                frames[int(key)] = int(f["file_location_id"])
            continue
        m = re.match(r"^(?:ENTRY )?%(\S+) \(.*\{$", line)
        if m:
            section = None
            current = computations.setdefault(m.group(1), [])
            continue
        m = re.match(r"^\s+(?:ROOT )?%(\S+) = (.*)$", line)
        if m and current is not None:
            shape, tail = _split_shape(m.group(2))
            opcode = tail.split("(", 1)[0]
            inst = {"name": m.group(1), "shape": shape, "opcode": opcode, "text": tail}
            for key in ("calls", "body", "condition", "to_apply"):
                found = re.search(rf"\b{key}=%([\w.\-]+)", tail)
                if found:
                    inst[key] = found.group(1)
            found = re.search(r'op_name="([^"]*)"', tail)
            inst["op_name"] = found.group(1) if found else ""
            found = re.search(r"stack_frame_id=(\d+)", tail)
            if found and int(found.group(1)) in frames:
                file_id, function_id, line_no = locations[frames[int(found.group(1))]]
                inst["source"] = f"{functions.get(function_id, '?')}"
                inst["where"] = f"{os.path.basename(files.get(file_id, '?'))}:{line_no}"
            current.append(inst)
    return computations


def _dot_flops(inst: dict, shapes: dict[str, str]) -> float:
    operands = re.findall(r"%([\w.\-]+)", inst["text"].split(")", 1)[0])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst["text"])
    if not operands or not contracting:
        return 0.0
    lhs = _shape_dims(shapes.get(operands[0], ""))
    k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
    return 2.0 * math.prod(_shape_dims(inst["shape"])) * k


def classify_hlo(computations: dict) -> dict[str, dict]:
    """Every instruction that can run as a thunk -> kind, phase, source, FLOPs."""
    info = {}
    for insts in computations.values():
        shapes = {i["name"]: i["shape"] for i in insts}
        for inst in insts:
            opcode = inst["opcode"]
            flops = 0.0
            inner = computations.get(inst.get("calls", ""), [])
            inner_ops = {i["opcode"] for i in inner} if opcode == "fusion" else {opcode}
            if opcode == "fusion":
                inner_shapes = {i["name"]: i["shape"] for i in inner}
                flops = sum(_dot_flops(i, inner_shapes) for i in inner if i["opcode"] == "dot")
            elif opcode == "dot":
                flops = _dot_flops(inst, shapes)
            if opcode in CONTROL:
                kind = "control"
            elif inner_ops & {"dot", "convolution"}:
                kind = "matmul"
            elif inner_ops & {"reduce", "reduce-window"}:
                kind = "reduction"
            elif inner_ops & STACKING and inner_ops <= MOVEMENT | STACKING:
                kind = "stacking"
            elif inner_ops <= MOVEMENT:
                kind = "layout"
            elif opcode == "custom-call":
                kind = "other"
            else:
                kind = "elementwise"
            info[inst["name"]] = {
                "kind": kind,
                "phase": phase_of(inst["op_name"]),
                "source": inst.get("source", "-"),
                "where": inst.get("where", "-"),
                "flops": flops,
                "shape": inst["shape"],
                "op_name": inst["op_name"],
                "fused": ",".join(sorted(inner_ops - {"parameter", "constant", "bitcast"})),
            }
    return info


def phase_of(op_name: str) -> str:
    if "rematted_computation" in op_name:
        return "loss recompute (remat)" if "jvp()" in op_name else "model recompute (remat)"
    if "transpose(jvp(Transformer))" in op_name:
        return "model backward"
    if "jvp(Transformer)" in op_name:
        return "model forward"
    if "transpose(jvp())" in op_name:
        return "loss backward"
    if "jvp()" in op_name:
        return "loss forward"
    if "threefry" in op_name:
        return "other"
    if op_name.startswith("jit(sft_step)/"):
        return "optimizer + metrics"
    return "other"


# --- ours under the profiler ------------------------------------------------------------


def profile_jax(config, batch: int, length: int, chunk: int, steps: int) -> dict:
    state, step, mesh = jax_step(config, chunk)
    data = shd.shard_batch(make_batch(config, batch, length), mesh)
    compiled = step.lower(state, data).compile()
    info = classify_hlo(parse_hlo(compiled.as_text()))
    module = compiled.as_text().split("\n", 1)[0].split()[1].rstrip(",")

    for _ in range(2):
        state, metrics = compiled(state, data)
        jax.block_until_ready((state, metrics))
    walls = []
    for _ in range(steps):  # unprofiled wall times
        start = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready((state, metrics))
        walls.append(time.perf_counter() - start)
    directory = tempfile.mkdtemp(prefix="profile_step_")
    try:
        jax.profiler.start_trace(directory)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, data)
            jax.block_until_ready((state, metrics))
        profiled_wall = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
        profile = jax.profiler.ProfileData.from_file(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    times: dict[str, float] = collections.defaultdict(float)  # self ns per instruction
    counts: dict[str, int] = collections.defaultdict(int)
    for plane in profile.planes:
        for line in plane.lines:
            stack: list[list] = []  # [end_ns, name, child_ns]
            for event in sorted(line.events, key=lambda e: (e.start_ns, -e.duration_ns)):
                stats = dict(event.stats)
                if stats.get("hlo_module") != module or "hlo_op" not in stats:
                    continue
                while stack and stack[-1][0] <= event.start_ns:
                    end, name, child = stack.pop()
                    times[name] -= child
                if stack:
                    stack[-1][2] += event.duration_ns
                name = stats["hlo_op"]
                times[name] += event.duration_ns
                counts[name] += 1
                stack.append([event.start_ns + event.duration_ns, name, 0.0])
            for end, name, child in stack:
                times[name] -= child
    return {
        "info": info,
        "times": {k: v / steps / 1e9 for k, v in times.items()},
        "counts": {k: v / steps for k, v in counts.items()},
        "wall": statistics.median(walls),
        "profiled_wall": profiled_wall,
    }


# --- PyTorch's step under its profiler --------------------------------------------------------

TORCH_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear_backward"}
TORCH_REDUCTION = (
    "sum", "mean", "softmax", "max", "norm", "nll_loss", "logsumexp", "amax", "var", "rsqrt_",
)  # fmt: skip
TORCH_LAYOUT = ("copy_", "clone", "contiguous", "transpose", "permute", "cat", "index_select",
                "expand", "view", "reshape", "t", "_to_copy", "to", "slice", "select", "as_strided",
                "unsqueeze", "embedding", "embedding_dense_backward", "fill_", "zero_", "empty",
                "index_add_", "scatter", "gather", "chunk", "split", "narrow", "detach")  # fmt: skip


def torch_kind(name: str) -> str:
    if name in TORCH_MATMUL or name.endswith("::matmul"):
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention (fused sdpa)"
    base = name.split("::")[-1]
    if any(r in base for r in TORCH_REDUCTION):
        return "reduction"
    if base in TORCH_LAYOUT or base.rstrip("_") in TORCH_LAYOUT:
        return "layout"
    if name.startswith("aten::"):
        return "elementwise"
    return "other"


def _torch_flops(name: str, shapes) -> float:
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
            return 2.0 * a[0] * a[1] * a[2] * b[2]
    except (IndexError, TypeError, ValueError):
        pass
    return 0.0


def profile_torch(config, batch: int, length: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    step = build_torch(config, batch, length)  # builds model + AdamW; we re-run its parts below
    model_holder = step.__closure__
    cells = {
        name: cell.cell_contents for name, cell in zip(step.__code__.co_freevars, model_holder)
    }
    model, opt, tokens = cells["model"], cells["opt"], cells["tokens"]

    def phased_step():
        with record_function("phase:forward"):
            loss = model(input_ids=tokens, labels=tokens).loss
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with record_function("phase:optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        phased_step()
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        phased_step()
        walls.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            phased_step()
        profiled_wall = (time.perf_counter() - start) / steps

    rows = collections.defaultdict(lambda: {"time": 0.0, "flops": 0.0, "count": 0})
    for event in prof.events():
        if event.name.startswith("phase:") or event.name.startswith("Optimizer"):
            continue
        phase, parent = "other", event.cpu_parent
        while parent is not None:
            if parent.name.startswith("phase:"):
                phase = parent.name[len("phase:") :]
                break
            parent = parent.cpu_parent
        self_us = event.self_cpu_time_total
        if self_us <= 0:
            continue
        key = (phase, torch_kind(event.name), event.name, str(event.input_shapes)[:90])
        rows[key]["time"] += self_us / 1e6 / steps
        rows[key]["flops"] += _torch_flops(event.name, event.input_shapes) / steps
        rows[key]["count"] += 1 / steps
    return {
        "rows": dict(rows),
        "wall": statistics.median(walls),
        "profiled_wall": profiled_wall,
        "threads": torch.get_num_threads(),
    }


# --- reports ---------------------------------------------------------------------------------


def _table(title: str, groups: dict, total: float, with_flops: bool = True) -> None:
    print(f"\n{title}")
    print("| | ms/step | share | GFLOP/s |\n|---|---|---|---|")
    for key, (t, flops) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        rate = f"{flops / t / 1e9:.0f}" if flops and t > 0 and with_flops else ""
        print(f"| {key} | {1e3 * t:.2f} | {100 * t / total:.1f}% | {rate} |")
    print(f"| total | {1e3 * total:.2f} | 100% | |")


def report_jax(result: dict, top: int) -> None:
    info, times = result["info"], result["times"]
    rows = [(name, t, info.get(name)) for name, t in times.items() if info.get(name)]
    total = sum(t for _, t, _ in rows)
    print(
        f"\nOURS: wall {1e3 * result['wall']:.1f} ms/step (median, unprofiled), profiled"
        f" {1e3 * result['profiled_wall']:.1f} ms/step; ops' summed time {1e3 * total:.1f} ms/step"
        f" ({sum(result['counts'].values()):.0f} op executions per step)"
    )
    for title, key in (
        ("ours by kind", lambda i: i["kind"]),
        ("ours by phase", lambda i: i["phase"]),
        ("ours by phase x kind", lambda i: f"{i['phase']} / {i['kind']}"),
        ("ours by source function x kind", lambda i: f"{i['source']} / {i['kind']}"),
    ):
        groups: dict = collections.defaultdict(lambda: [0.0, 0.0])
        for name, t, i in rows:  # FLOPs: the instruction's, times its runs per step
            groups[key(i)][0] += t
            groups[key(i)][1] += i["flops"] * result["counts"][name]
        _table(title, {k: tuple(v) for k, v in groups.items()}, total)
    print(f"\nours: the {top} costliest instructions")
    print("| op | kind | phase | source | shape | fused ops | runs | ms/step | GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, t, i in sorted(rows, key=lambda r: -r[1])[:top]:
        runs = result["counts"][name]
        rate = f"{i['flops'] * runs / t / 1e9:.0f}" if i["flops"] and t > 0 else ""
        print(
            f"| {name} | {i['kind']} | {i['phase']} | {i['source']} ({i['where']}) | {i['shape'][:40]}"
            f" | {i['fused'][:50]} | {runs:.0f} | {1e3 * t:.2f} | {rate} |"
        )


def report_torch(result: dict, top: int) -> None:
    rows = result["rows"]
    total = sum(r["time"] for r in rows.values())
    print(
        f"\nPYTORCH ({result['threads']} threads): wall {1e3 * result['wall']:.1f} ms/step"
        f" (median, unprofiled), profiled {1e3 * result['profiled_wall']:.1f} ms/step;"
        f" ops' summed self CPU time {1e3 * total:.1f} ms/step"
    )
    for title, key in (
        ("pytorch by kind", lambda k: k[1]),
        ("pytorch by phase", lambda k: k[0]),
        ("pytorch by phase x kind", lambda k: f"{k[0]} / {k[1]}"),
        ("pytorch by op", lambda k: f"{k[2]} / {k[1]}"),
    ):
        groups: dict = collections.defaultdict(lambda: [0.0, 0.0])
        for k, r in rows.items():
            groups[key(k)][0] += r["time"]
            groups[key(k)][1] += r["flops"]
        if title == "pytorch by op":
            groups = dict(sorted(groups.items(), key=lambda kv: -kv[1][0])[:top])
        _table(title, {k: tuple(v) for k, v in groups.items()}, total)
    print(f"\npytorch: the {top} costliest (op, phase, input shapes)")
    print(
        "| op | phase | kind | input shapes | calls | ms/step | GFLOP/s |\n|---|---|---|---|---|---|---|"
    )
    for (phase, kind, name, shapes), r in sorted(rows.items(), key=lambda kv: -kv[1]["time"])[:top]:
        rate = f"{r['flops'] / r['time'] / 1e9:.0f}" if r["flops"] and r["time"] > 0 else ""
        print(
            f"| {name} | {phase} | {kind} | {shapes} | {r['count']:.0f} | {1e3 * r['time']:.2f} | {rate} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps of each system")
    parser.add_argument("--loss-chunk", type=int, default=256)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-jax", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=0)
    args = parser.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    for shape in args.shape or ["study_mini", "llama_50m"]:
        make_config, batch, length = SHAPES[shape]
        config = make_config()
        print(
            f"\n## {shape}: {config.num_params() / 1e6:.1f}M params, batch {batch} x {length},"
            f" loss chunk {args.loss_chunk}, {args.steps} profiled steps; load average"
            f" {load_average():.2f}"
        )
        if not args.skip_jax:
            report_jax(profile_jax(config, batch, length, args.loss_chunk, args.steps), args.top)
        if not args.skip_torch:
            report_torch(profile_torch(config, batch, length, args.steps), args.top)
        print(f"\nload average after {shape}: {load_average():.2f}")


if __name__ == "__main__":
    main()

"""LoRA against full fine-tuning on Gemma 3 270M: peak RSS of a PPO iteration and an EI round.

    RL_REASON_DATA_DIR=../shared/data python benchmarks/gemma3_270m_lora_memory.py

Runs gemma3_270m_ppo_memory.py and gemma3_270m_ei_memory.py, each with full
fine-tuning and with LoRA rank 16 (alpha 32, every attention and MLP kernel),
as separate processes one after the other (a process's peak RSS is its own),
and prints their JSON lines and a table. Run it alone on the machine: the
phase times move with the load (printed before and after, with the float32
matmul peak this machine read).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchlib import load_average, matmul_peak_flops

HERE = os.path.dirname(os.path.abspath(__file__))
LORA = ["--set", "lora.rank=16", "--set", "lora.alpha=32.0"]
RUNS = [
    ("PPO iteration", "gemma3_270m_ppo_memory.py", []),
    ("PPO iteration", "gemma3_270m_ppo_memory.py", LORA),
    ("EI round", "gemma3_270m_ei_memory.py", []),
    ("EI round", "gemma3_270m_ei_memory.py", LORA),
]


def main() -> None:
    peak = matmul_peak_flops() / 1e9
    print(f"float32 matmul peak {peak:.0f} GFLOP/s, load {load_average():.2f}", flush=True)
    rows = []
    for name, script, extra in RUNS:
        command = [sys.executable, os.path.join(HERE, script), *extra]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(result), flush=True)
        seconds = result["seconds"]
        if isinstance(seconds, list):  # the PPO iteration's phases
            seconds = sum(phases["total"] for phases in seconds)
        rows.append((name, "LoRA r16" if extra else "full", result["peak_rss_gb"], seconds))
    print(f"\n| run | trained | peak RSS | seconds |  (matmul peak {peak:.0f} GFLOP/s)")
    print("|---|---|---|---|")
    for name, kind, rss, seconds in rows:
        print(f"| {name} | {kind} | {rss:.2f} GB | {seconds:.0f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The real model with LoRA, end to end: Gemma 3 270M (the PyPI GGUF package) on SVAMP.
#
#     RL_REASON_DATA_DIR=../shared/data bash launch/gemma3_270m_svamp_lora.sh [workdir]
#
# A LoRA SFT start on SVAMP's train questions, then Expert Iteration and GRPO with LoRA
# from it, each a run of its own under the workdir (default runs/gemma3_svamp_lora). Every
# stage resumes: rerun the same command after a stop and it goes on where it was. Each
# RL run measures its start on the 300 held-out questions first (docs/lora.md has the
# figures of a run, BENCHMARKS.md the memory).
set -euo pipefail
workdir=${1:-runs/gemma3_svamp_lora}
cd "$(dirname "$0")/.."
python launch/train.py --config=configs/gemma3_270m_svamp_lora_sft.py --workdir="$workdir/sft"
for algorithm in ei grpo; do
    python launch/train.py --config="configs/gemma3_270m_svamp_lora_$algorithm.py" \
        --workdir="$workdir/$algorithm" --config.model_source.path="$workdir/sft"
done

"""GRPO with LoRA on the built-in synthetic arithmetic task, from configs/arith_start.py.

    python launch/train.py --config=configs/arith_grpo_lora.py --workdir=runs/grpo_lora \
        --config.model_source.path=runs/sft

configs/arith_grpo.py with rank-8 adapters (alpha 16) on every attention and
MLP kernel instead of every parameter: the reference is the start itself
(the adapters switched off) and AdamW keeps moments for the adapters only.
LoRA's usual learning rate, ten times full fine-tuning's (docs/lora.md).
"""

from configs import arith_grpo


def get_config():
    config = arith_grpo.get_config()
    config.lora.update(rank=8, alpha=16.0)
    config.optim.lr = 1e-3
    return config

"""SFT of a small Llama-style model on the built-in synthetic arithmetic task.

It needs no download and shows learning on a laptop CPU in a few minutes
(the default job of `python launch/train.py` is the study in miniature,
`configs/study_mini.py`, whose pretraining stage uses this model):

    python launch/train.py --config=configs/sft_synthetic.py --workdir=runs/sft
"""

from rl_reason.experiments.config import base_config
from rl_reason.models.config import ModelConfig


def get_config():
    config = base_config()
    # vocab_size 0: taken from the task's tokenizer.
    config.model.update(
        ModelConfig(
            vocab_size=0,
            hidden_dim=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            mlp_dim=384,
            # Measured fastest for this small model's step on a 2-core CPU (1.13x
            # PyTorch's against 0.99x with "dots"; BENCHMARKS.md, "Training step").
            remat="full",
        ).to_dict()
    )
    return config

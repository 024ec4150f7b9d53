"""SFT of a small Llama-style model on the built-in synthetic arithmetic task.

The default job of `python launch/train.py`: it needs no download and shows
learning on a laptop CPU in a few minutes.
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
        ).to_dict()
    )
    return config

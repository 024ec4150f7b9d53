"""Evaluates a run of the synthetic task (default: the SFT model of `python launch/train.py`)."""

from rl_reason.experiments.config import eval_config


def get_config():
    config = eval_config()
    config.model_source.kind = "run"
    config.model_source.path = "runs/default/sft"
    config.eval.task = "synthetic"
    config.eval.num_examples = 256
    config.eval.num_samples = 4
    config.eval.max_new_tokens = 64
    config.sampling.prompt_buckets = (64, 128)
    return config

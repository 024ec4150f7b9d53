"""Gemma 3 270M (base, from the PyPI GGUF package), few-shot on a fixed GSM8K test subset.

As the study does for pretrained starting points: worked GSM8K exemplars
before each question, greedy maj@1 and K samples for maj@K / pass@K.
"""

from rl_reason.experiments.config import gemma3_270m_few_shot_config


def get_config():
    config = gemma3_270m_few_shot_config("gsm8k", num_examples=200)  # the first 200 test questions
    config.eval.max_new_tokens = 192
    return config

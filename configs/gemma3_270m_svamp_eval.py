"""Gemma 3 270M (base, from the PyPI GGUF package), few-shot on all 1000 SVAMP problems.

SVAMP has no train split: the exemplars are GSM8K train solutions, as in the
study's transfer evaluation.
"""

from rl_reason.experiments.config import gemma3_270m_few_shot_config


def get_config():
    config = gemma3_270m_few_shot_config("svamp", num_examples=0)  # all 1000
    config.eval.max_new_tokens = 128
    return config

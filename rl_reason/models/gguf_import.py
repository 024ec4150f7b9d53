"""Import Gemma 3 GGUF files (llama.cpp's format), dequantized, with their tokenizer.

The GGUF tensors are presented under their HF names and in HF conventions,
so the Hugging Face importer's checks and sharded placement apply unchanged:
names are mapped with gguf's own table, shapes are numpy order (GGUF lists
them innermost first), and Gemma norms lose the 1 that llama.cpp's
converter added to them (transformers' GGUF loader does the same).

Fields llama.cpp does not store but hard-codes for Gemma 3 (a global layer
every 6, local RoPE base 10000, the query scale) are filled in as llama.cpp
computes them.
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np
import transformers
from jax.sharding import Mesh

from rl_reason.models import hf_weights
from rl_reason.models.hf_config import model_config_from_hf
from rl_reason.models.hf_import import LoadedModel, place_params
from rl_reason.parallel import sharding as shd

SUPPORTED_ARCHITECTURES = ("gemma3",)
_GEMMA3_GLOBAL_EVERY = 6
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0
_GEMMA3_27B_LAYERS = 62  # llama.cpp scales 27B's queries by (hidden / heads) ** -0.5


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def gguf_hf_config(reader: gguf.GGUFReader) -> transformers.PretrainedConfig:
    """The transformers config of the model in a GGUF file."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; rl_reason imports"
            f" {SUPPORTED_ARCHITECTURES} from GGUF (Llama and Qwen2 from HF checkpoints)."
        )
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    shapes = {t.name: t.shape for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError("The GGUF file has no token_embd.weight tensor.")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    num_layers = get("block_count")
    head_dim = get("attention.key_length", hidden // heads)
    fields = {
        "vocab_size": int(shapes["token_embd.weight"][-1]),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": get("context_length"),
        "sliding_window": get("attention.sliding_window"),
        "sliding_window_pattern": _GEMMA3_GLOBAL_EVERY,
        "rope_theta": get("rope.freq_base"),
        "rope_local_base_freq": _GEMMA3_LOCAL_ROPE_BASE,
        "query_pre_attn_scalar": hidden // heads if num_layers == _GEMMA3_27B_LAYERS else head_dim,
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        fields["rope_scaling"] = {"rope_type": scaling, "factor": get("rope.scaling.factor")}
    return transformers.Gemma3TextConfig(**fields)


class GGUFTensors:
    """A GGUF file's tensors under HF names, dequantized to float32 on demand.

    Tensors the HF names do not cover keep their GGUF names, so that the
    importer reports them as unexpected.
    """

    def __init__(self, reader: gguf.GGUFReader, hf_names: list[str], arch: str, num_layers: int):
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
        name_map = gguf.get_tensor_name_map(arch_id, num_layers)
        to_hf = {}
        for hf_name in hf_names:
            stem, suffix = hf_name.rsplit(".", 1)
            to_hf[f"{name_map.get_name(stem)}.{suffix}"] = hf_name
        self._tensors = {to_hf.get(t.name, t.name): t for t in reader.tensors}

    @property
    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))

    def get(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        array = array.reshape(self.shape(name))
        # Every Gemma norm (the only architecture here) carries llama.cpp's + 1.
        return array - 1.0 if name.endswith("norm.weight") else array


def load_gguf(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    with_tokenizer: bool = True,
    **overrides,
) -> LoadedModel:
    """Imports a Gemma 3 GGUF file; `overrides` as in `load_hf` (param_dtype float32 by default).

    The tokenizer is rebuilt by transformers from the file's vocabulary
    (about 20 s for Gemma's 262k tokens); with_tokenizer=False skips it.
    """
    path = os.fspath(path)
    reader = gguf.GGUFReader(path)
    config = model_config_from_hf(gguf_hf_config(reader), **overrides)
    hf_names = [
        n for spec in hf_weights.tensor_specs(config) for n in spec.hf_names(config.num_layers)
    ]
    arch = _field(reader, "general.architecture")
    source = GGUFTensors(reader, hf_names, arch, config.num_layers)
    params = place_params(config, source, mesh, rules)
    tokenizer = None
    if with_tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
        )
    return LoadedModel(config, params, tokenizer)

"""GGUF import of Gemma 3 against transformers' own GGUF loader, on a tiny file written
the way llama.cpp's converter writes one (GGUF names, norms + 1, quantized weights)."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rl_reason.models.gguf_import import load_gguf
from rl_reason.models.hf_config import model_config_from_hf
from rl_reason.models.hf_export import hf_state_dict
from rl_reason.models.transformer import Transformer, default_positions
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd

VOCAB, LAYERS, WINDOW = 96, 6, 4  # llama.cpp fixes Gemma 3's pattern: layer 6 is global
Q = gguf.GGMLQuantizationType


def _hf_gemma3():
    """Head dim 256 (= query_pre_attn_scalar, which transformers' GGUF loader assumes)."""
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=WINDOW,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.3)
    return model


def _write_gguf(path, model, arch="gemma3", extra_tensor=None):
    """Writes `model` as llama.cpp does: Q8_0 linears, F16 embedding, F32 norms + 1."""
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, LAYERS)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(WINDOW)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":  # tied
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = f"{name_map.get_name(stem)}.{suffix}"
        array = tensor.float().numpy()
        if name.endswith("norm.weight"):
            writer.add_tensor(name, array + 1.0)
        elif name == "token_embd.weight":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, Q.Q8_0), raw_dtype=Q.Q8_0)
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = _hf_gemma3()
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    _write_gguf(path, model)
    return path, model


def _logits(loaded, tokens, mesh=None):
    model = Transformer(loaded.config)

    def forward(params, t):
        mask = jnp.ones(t.shape, bool)
        out = model.apply(params, t, default_positions(mask), mask)
        return model.apply(params, out.hidden, method=Transformer.logits)

    if mesh is None:
        return np.asarray(jax.jit(forward)(loaded.params, tokens))
    with shd.activation_sharding(mesh, shd.DEFAULT_RULES):
        return np.asarray(jax.jit(forward)(loaded.params, shd.shard_batch(tokens, mesh)))


@pytest.mark.parametrize("mesh_shape", [None, (1, 4, 2)])
def test_gguf_logits_match_transformers_gguf_loader(tiny_gguf, mesh_shape):
    path, hf_model = tiny_gguf
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    mesh = mesh_lib.make_mesh(mesh_shape) if mesh_shape else None
    loaded = load_gguf(path, mesh, with_tokenizer=False)
    assert loaded.config.local_layers == (True,) * 5 + (False,)
    assert loaded.config.sliding_window == WINDOW and loaded.config.tie_embeddings
    tokens = np.random.default_rng(0).integers(0, VOCAB, (4, 16)).astype(np.int32)
    with torch.no_grad():
        want = reference(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        unquantized = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    got = _logits(loaded, tokens, mesh)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # Q8_0 really was dequantized: it moves the logits off the float32 model's, a little.
    assert 1e-3 < np.abs(got - unquantized).max() < 0.1 * np.abs(unquantized).max()


def test_gguf_tensors_and_config_equal_transformers_gguf_loader(tiny_gguf):
    """Every tensor, norms included (the + 1 is neither lost nor applied twice)."""
    path, _ = tiny_gguf
    loaded = load_gguf(path, with_tokenizer=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    assert model_config_from_hf(reference.config) == loaded.config
    want = {k: v.numpy() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    got = hf_state_dict(loaded.config, loaded.params)
    assert got.keys() == want.keys()
    for name, tensor in got.items():
        np.testing.assert_allclose(tensor, want[name], atol=1e-6, err_msg=name)


def test_gguf_errors(tiny_gguf, tmp_path):
    _, model = tiny_gguf
    _write_gguf(tmp_path / "llama.gguf", model, arch="llama")
    with pytest.raises(ValueError, match="GGUF architecture 'llama' is not supported"):
        load_gguf(tmp_path / "llama.gguf", with_tokenizer=False)
    _write_gguf(tmp_path / "extra.gguf", model, extra_tensor="blk.0.attn_sinks.weight")
    with pytest.raises(ValueError, match="unexpected tensors: blk.0.attn_sinks.weight"):
        load_gguf(tmp_path / "extra.gguf", with_tokenizer=False)

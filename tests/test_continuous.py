"""The continuous-batching engine: the static sampler's tokens and log-probs, whatever the slots."""

import re
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_reason.data import synthetic, templates
from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.experiments import config as config_lib
from rl_reason.experiments.rollout import engine_config
from rl_reason.models.config import tiny_gemma3, tiny_llama
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from rl_reason.sampling.continuous import Engine, EngineConfig, Results, Slots, decode
from rl_reason.sampling.engine import Sampler
from rl_reason.sampling.pages import PagePool, PoolExhausted, prefix_keys
from rl_reason.sampling.sampler import SamplingConfig, left_pad, sample_jit

# attention_block_k=8: the paged kernel reads two pages per block, so a row spans
# several blocks; Gemma 3's window of 4 makes whole blocks invisible to local layers.
CONFIGS = {
    "llama": tiny_llama(attention_block_k=8),
    "qwen2": tiny_llama(qkv_bias=True, num_kv_heads=2, attention_block_k=8),
    "gemma3": tiny_gemma3(num_kv_heads=2, attention_block_k=8),
}


def _params(config, seed=0):
    tokens = jnp.zeros((1, 2), jnp.int32)
    return nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(seed), tokens, tokens))


def _prompt_ids(vocab, lengths=(5, 9, 3, 12, 7, 6), seed=1):
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, vocab, 4).tolist()  # a common start: prefix-cache hits
    return [shared + rng.integers(3, vocab, n).tolist() for n in lengths]


def _llama_case():
    config = CONFIGS["llama"]
    return config, _params(config), _prompt_ids(config.vocab_size)


def _static(config, params, ids, options, seed=0):
    """The static sampler on the same prompts, left-padded."""
    tokens, mask = left_pad(ids, max(map(len, ids)))
    decoder = Transformer(config.replace(scan_layers=False))
    out = sample_jit(decoder, params, tokens, mask, jax.random.PRNGKey(seed), options)
    return jax.tree.map(np.asarray, out)


def _engine(config, params, ids, options, seed=0, **engine):
    engine = Engine(config, EngineConfig(**{"slots": 3, "page_size": 4, **engine}))
    out = engine.generate(params, ids, jax.random.PRNGKey(seed), options)
    return out, engine


def _assert_same(a, b):
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.finish_reason, b.finish_reason)
    np.testing.assert_array_equal(a.completion_tokens, b.completion_tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
    np.testing.assert_allclose(a.sampling_logprobs, b.sampling_logprobs, atol=2e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_and_sampled_rows_equal_the_static_sampler(name):
    config = CONFIGS[name]
    params = _params(config)
    ids = _prompt_ids(config.vocab_size)
    for options in (
        SamplingConfig(max_new_tokens=14, temperature=0.0, eos_ids=(5,), stop_sequences=((7, 8),)),
        SamplingConfig(
            max_new_tokens=14,
            temperature=1.0,
            top_p=0.9,
            num_samples=3,
            eos_ids=(5,),
            greedy_first=True,
        ),
    ):
        ours, engine = _engine(config, params, ids, options)
        _assert_same(ours, _static(config, params, ids, options))
        assert engine.pool.all_free()
        assert engine.stats["shared_pages"] > 0  # the common start and siblings were shared


def test_step_conditioned_rows_equal_the_static_sampler():
    # Dense RCRL: after every step start the step token is given, not chosen.
    config, params, ids = _llama_case()
    starts = tuple(range(3, config.vocab_size, 9))
    options = SamplingConfig(
        max_new_tokens=14, temperature=1.0, num_samples=2, step_token=2, step_starts=starts
    )
    ours, _ = _engine(config, params, ids, options)
    static = _static(config, params, ids, options)
    _assert_same(ours, static)
    assert (ours.completion_tokens == 2).sum() > 4  # steps were conditioned


def test_a_rows_tokens_do_not_depend_on_slots_order_or_pool_size():
    config, params, ids = _llama_case()
    options = SamplingConfig(max_new_tokens=16, temperature=1.0, num_samples=4)
    base, _ = _engine(config, params, ids, options, slots=3)
    for engine in (dict(slots=1), dict(slots=5, decode_horizon=3, admit_after=1, min_slots=1)):
        _assert_same(_engine(config, params, ids, options, **engine)[0], base)
    # Rows arriving in another order (longest prompts first, siblings apart) or a
    # prompt sampled alone (its row_offset kept): the same tokens, row for row.
    order = sorted(range(len(ids) * 4), key=lambda r: (-len(ids[r // 4]), r % 4, r))
    engine = Engine(config, EngineConfig(slots=3, page_size=4))  # base's programs
    shuffled = engine.generate(params, ids, jax.random.PRNGKey(0), options, row_order=order)
    _assert_same(shuffled, base)
    one = engine.generate(params, ids[2:3], jax.random.PRNGKey(0), options, row_offset=2)
    np.testing.assert_array_equal(one.completion_tokens, base.completion_tokens[8:12])


def test_a_small_pool_preempts_and_recomputes_exactly():
    config, params, ids = _llama_case()
    options = SamplingConfig(max_new_tokens=20, temperature=1.0, num_samples=2)
    base, _ = _engine(config, params, ids, options, slots=6)
    page_bytes = EngineConfig(page_size=4).page_bytes(config)
    small, engine = _engine(config, params, ids, options, slots=6, kv_cache_bytes=page_bytes * 16)
    assert engine.stats["preempted"] > 0 and engine.stats["pool_pages"] == 15
    _assert_same(small, base)
    assert engine.pool.all_free()
    with pytest.raises(PoolExhausted, match="kv_cache_bytes"):
        _engine(config, params, ids, options, kv_cache_bytes=page_bytes * 4)


def test_slots_split_over_the_mesh_give_the_single_device_rows():
    # 4 batch shards (data x fsdp), each with 2 slots and a pool of its own; the tensor
    # axis's 2 devices compute the same rows. The weights come sharded as the learner
    # holds them. Tokens and log-probs are the one-device engine's, row for row.
    config, params, ids = _llama_case()
    mesh = mesh_lib.make_mesh((2, 2, 2))
    tokens = jnp.zeros((1, 2), jnp.int32)
    init = lambda rng: Transformer(config).init(rng, tokens, tokens)
    params_on_mesh = jax.device_put(params, shd.param_shardings(init, mesh, shd.DEFAULT_RULES))
    options = SamplingConfig(
        max_new_tokens=14, temperature=1.0, top_p=0.9, num_samples=3, eos_ids=(5,),
        stop_sequences=((7, 8),), greedy_first=True,
    )  # fmt: skip
    base, _ = _engine(config, params, ids, options)
    page_bytes = EngineConfig(page_size=4).page_bytes(config)
    for pool_bytes in (0, 10 * page_bytes):  # room for every slot; room to preempt
        engine = Engine(
            config, EngineConfig(slots=8, page_size=4, kv_cache_bytes=pool_bytes), mesh=mesh
        )
        got = engine.generate(params_on_mesh, ids, jax.random.PRNGKey(0), options)
        _assert_same(got, base)
        assert len(engine.pools) == 4 and all(pool.all_free() for pool in engine.pools)
        assert engine.stats["shared_pages"] > 0  # each shard's prefix cache: the K siblings
    assert engine.stats["preempted"] > 0 and engine.stats["pool_pages"] == 4 * 9


def test_page_pool_shares_caches_and_evicts_least_recent():
    pool = PagePool(6)
    keys = prefix_keys(list(range(10)), 4, 9)  # two full pages
    a = pool.allocate(3)
    assert 0 not in a and pool.available() == 2
    pool.register(keys[0], a[0])
    pool.register(keys[1], a[1])
    assert pool.lookup(keys) == a[:2] and pool.refs[a[0]] == 2
    pool.release(a)
    assert pool.available() == 3  # a[2] free; a[0], a[1] still held once
    pool.release(a[:2])
    assert pool.available() == 5 and pool.lookup(keys[:1]) == a[:1]
    pool.release(a[:1])
    got = pool.allocate(5)  # free pages first, then the cached ones, oldest released first
    assert set(got) == {1, 2, 3, 4, 5} and pool.lookup(keys) == []
    pool.release(got)
    assert pool.all_free()
    with pytest.raises(PoolExhausted):
        pool.allocate(6)


def test_the_text_sampler_with_the_continuous_engine_gives_the_static_texts():
    texts = [ex["question"] + "\n" + ex["answer"] for ex in synthetic.generate("train", 200)]
    tokenizer = tokenizer_lib.train_tokenizer(texts, vocab_size=300)
    config = tiny_llama(vocab_size=len(tokenizer))
    params = _params(config)
    prompts = [templates.format_prompt(ex["question"]) for ex in synthetic.generate("test", 5)]
    static = Sampler(config, tokenizer, batch_size=2, prompt_buckets=(64, 128))
    paged = Sampler(config, tokenizer, prompt_buckets=(64, 128), engine=EngineConfig(slots=4))
    rng = jax.random.PRNGKey(3)
    options = static.sampling_config(max_new_tokens=24, temperature=1.0, num_samples=3)
    a = static.generate(params, prompts, rng, options, prompt_offset=7)
    b = paged.generate(params, prompts, rng, options, prompt_offset=7)
    assert a.texts == b.texts
    assert a.rollout.prompt_tokens.shape == b.rollout.prompt_tokens.shape  # the bucket's width
    np.testing.assert_array_equal(a.rollout.prompt_tokens, b.rollout.prompt_tokens)
    _assert_same(a.rollout, b.rollout)
    assert paged.engine.stats["shared_pages"] > 0  # the template's common start, the K siblings


def test_the_sampling_section_chooses_the_engine():
    s = config_lib.rl_config("grpo").sampling
    assert engine_config(s) is None
    s.engine = "continuous"
    assert engine_config(s) == EngineConfig(slots=s.slots, page_size=16)
    s.engine = "paged"
    with pytest.raises(ValueError, match="static"):
        engine_config(s)
    with pytest.raises(ValueError, match="multiple of 8"):
        Sampler(tiny_llama(), None, mesh=mesh_lib.make_mesh((8, 1, 1)), engine=EngineConfig(6))


def test_the_decode_loop_writes_the_page_pool_in_place():
    # Structural, not a timing: the compiled loop copies no page pool (a copy would
    # cost the whole pool per layer and step).
    config = CONFIGS["llama"]
    params = _params(config)
    model = Transformer(config.replace(scan_layers=False))
    slots, pages, rows = 4, 25, 8
    shape = (pages, 4, config.num_kv_heads, config.head_dim)
    pool = tuple(tuple(jnp.zeros(shape) for _ in range(config.num_layers)) for _ in range(2))
    zeros = lambda *s, dtype=jnp.int32: jnp.zeros(s, dtype)
    state = Slots(
        row=zeros(slots),
        result_row=zeros(slots),
        live=zeros(slots, dtype=bool),
        token=zeros(slots),
        position=zeros(slots),
        generated=zeros(slots),
        greedy=zeros(slots, dtype=bool),
        recent=zeros(slots, 1),
        given=zeros(slots, dtype=bool),
        page_table=zeros(slots, 6),
    )
    results = Results(
        tokens=zeros(rows, 10),
        logprobs=zeros(rows, 10, dtype=jnp.float32),
        sampling_logprobs=zeros(rows, 10, dtype=jnp.float32),
        lengths=zeros(rows),
        finish_reason=zeros(rows),
    )
    options = SamplingConfig(max_new_tokens=10)
    args = (params, jax.random.PRNGKey(0), jnp.int32(0), state, results, pool, jnp.int32(5), 0)
    hlo = decode.lower(model, options, *args).compile().as_text()
    pool_shapes = {
        f"f32[{pages},4,{config.num_kv_heads},{config.head_dim}]",
        f"f32[{pages * 4},{config.num_kv_heads},{config.head_dim}]",  # the flat view written
    }
    copies = re.findall(r"= (f32\[[0-9,]+\])\{[0-9,]*\} copy\(", hlo)
    assert "while" in hlo and pool_shapes & set(re.findall(r"f32\[[0-9,]+\]", hlo))
    assert not pool_shapes & set(copies), copies

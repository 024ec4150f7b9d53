"""The sampler: greedy == argmax, log-probs == the learner's, shared prefill, masks, stops, sharding."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_reason.algorithms.logprobs import token_logprobs
from rl_reason.data import synthetic, tokenizer as tokenizer_lib
from rl_reason.models.config import tiny_gemma3, tiny_llama
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.sampling import sampler as sampler_lib
from rl_reason.sampling.engine import Sampler, common_prefix_length, pick_bucket
from rl_reason.sampling.sampler import EOS, LENGTH, STOP, SamplingConfig, sample_jit

CONFIGS = {"llama": tiny_llama(), "gemma3": tiny_gemma3(num_kv_heads=2)}


def _setup(name, seed=0):
    config = CONFIGS[name]
    tokens = jnp.zeros((1, 2), jnp.int32)
    params = nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(seed), tokens, tokens))
    return Transformer(config.replace(scan_layers=False)), Transformer(config), params


def _prompts(vocab, lengths=(5, 9, 3, 7), width=10, seed=1):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for row, n in enumerate(lengths):
        tokens[row, width - n :] = rng.integers(3, vocab, n)
        mask[row, width - n :] = True
    return jnp.asarray(tokens), jnp.asarray(mask)


def _sample(model, params, tokens, mask, seed=0, **options):
    config = SamplingConfig(**{"max_new_tokens": 8, **options})
    return sample_jit(model, params, tokens, mask, jax.random.PRNGKey(seed), config)


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_loop_updates_the_cache_in_place(name):
    # A structural property, not a timing: the compiled loop holds no copy of
    # a whole cache buffer (XLA inserted two per buffer and step before the
    # cache write was ordered after attention's read).
    decoder, scanned, params = _setup(name)
    tokens, mask = _prompts(scanned.config.vocab_size)
    config = SamplingConfig(max_new_tokens=8, min_rows=0)
    hlo = (
        sample_jit.lower(decoder, params, tokens, mask, jax.random.PRNGKey(0), config)
        .compile()
        .as_text()
    )
    c, rows, slots = scanned.config, tokens.shape[0], tokens.shape[1] + 8
    cache_shapes = {
        f"f32[{rows},{c.num_kv_heads},{slots},{c.head_dim}]",  # keys
        f"f32[{rows},{c.num_kv_heads},{c.head_dim},{slots}]",  # values
    }
    copies = re.findall(r"= (f32\[[0-9,]+\])\{[0-9,]*\} copy\(", hlo)
    assert "while" in hlo and cache_shapes & set(re.findall(r"f32\[[0-9,]+\]", hlo))
    assert not cache_shapes & set(copies), copies


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_equals_stepwise_argmax_of_full_forward(name):
    decoder, scanned, params = _setup(name)
    tokens, mask = _prompts(scanned.config.vocab_size)
    rollout = _sample(decoder, params, tokens, mask, temperature=0.0)
    # The plain definition: no cache, no left padding; each row right-padded
    # to one width (padding after the last token cannot change its logits).
    seqs = [list(np.asarray(tokens[r])[np.asarray(mask[r])]) for r in range(tokens.shape[0])]
    width = tokens.shape[1] + 8

    @jax.jit
    def next_tokens(batch, lengths):
        valid = jnp.arange(width)[None] < lengths[:, None]
        out = scanned.apply(params, batch, jnp.arange(width)[None].repeat(len(batch), 0), valid)
        last = jnp.take_along_axis(out.hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(scanned.apply(params, last, method=Transformer.logits), -1)

    for _ in range(8):
        batch = np.asarray([s + [0] * (width - len(s)) for s in seqs], np.int32)
        chosen = next_tokens(batch, jnp.asarray([len(s) for s in seqs]))
        for seq, token in zip(seqs, np.asarray(chosen)):
            seq.append(int(token))
    np.testing.assert_array_equal(rollout.completion_tokens, [s[-8:] for s in seqs])
    assert np.all(rollout.finish_reason == LENGTH) and np.all(rollout.lengths == 8)
    assert np.all(rollout.sampling_logprobs == 0)


@pytest.mark.parametrize("name", CONFIGS)
def test_rollout_logprobs_equal_learner_logprobs(name):
    """PPO's ratio is exactly 1 before the first update, left padding and early stops included."""
    decoder, scanned, params = _setup(name)
    tokens, mask = _prompts(scanned.config.vocab_size)
    rollout = _sample(
        decoder, params, tokens, mask, temperature=0.7, top_k=20, num_samples=2, eos_ids=(5, 6, 7)
    )
    seq = rollout.sequences()
    learner = token_logprobs(scanned, params, seq["tokens"], seq["input_mask"], chunk_size=5)
    width = tokens.shape[1]
    recomputed = learner.logprobs[:, width:] * rollout.completion_mask
    np.testing.assert_allclose(recomputed, rollout.logprobs, atol=2e-5)
    ratio = jnp.exp(recomputed - rollout.logprobs)
    np.testing.assert_allclose(ratio[rollout.completion_mask], 1.0, atol=5e-5)
    # Tempered and cut, the sampling distribution differs from the policy.
    live = np.asarray(rollout.completion_mask)
    assert not np.allclose(
        np.asarray(rollout.sampling_logprobs)[live], np.asarray(rollout.logprobs)[live]
    )


@pytest.mark.parametrize("options", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9)])
def test_shared_prefill_equals_independent_prefills(options):
    """K samples of a prompt share its prefill and read its one cache (`groups`): the same
    rollout as K copies of the prompt, each prefilled and cached on its own."""
    decoder, scanned, params = _setup("llama")
    tokens, mask = _prompts(scanned.config.vocab_size)
    shared = _sample(decoder, params, tokens, mask, num_samples=3, **options)
    repeated = _sample(
        decoder, params, jnp.repeat(tokens, 3, 0), jnp.repeat(mask, 3, 0), num_samples=1, **options
    )
    np.testing.assert_array_equal(shared.completion_tokens, repeated.completion_tokens)
    np.testing.assert_allclose(shared.logprobs, repeated.logprobs, atol=1e-5)
    if options["temperature"] > 0:  # the K samples of a prompt really differ
        per_prompt = np.asarray(shared.completion_tokens).reshape(4, 3, -1)
        assert any(len({tuple(s) for s in group}) > 1 for group in per_prompt)


def test_top_k_and_top_p_masks():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: np.isfinite(
        np.asarray(sampler_lib._filter_logits(logits, SamplingConfig(**kw)))
    )[0].tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(top_p=0.01) == [True, False, False, False]  # the top token always stays
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    tokens, policy, sampling = sampler_lib.choose_tokens(
        jnp.repeat(logits, 2000, 0), keys, SamplingConfig(top_p=0.7)
    )
    counts = np.bincount(np.asarray(tokens), minlength=4) / 2000
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.04)
    np.testing.assert_allclose(policy, jnp.log(jnp.asarray([0.5, 0.3]))[tokens], atol=1e-5)
    np.testing.assert_allclose(sampling, jnp.log(jnp.asarray([0.625, 0.375]))[tokens], atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_shared_prefix_equals_whole_prompts(name):
    """A prefix prefilled once == the same tokens in every prompt, past Gemma's window too."""
    decoder, scanned, params = _setup(name)
    vocab = scanned.config.vocab_size
    prefix = jnp.asarray(np.random.default_rng(5).integers(3, vocab, 40), jnp.int32)
    suffix, suffix_mask = _prompts(vocab)
    whole = jnp.concatenate([jnp.broadcast_to(prefix, (4, 40)), suffix], axis=1)
    whole_mask = jnp.concatenate([jnp.ones((4, 40), bool), suffix_mask], axis=1)
    # Move each row's padding to the left, as the engine pads whole prompts.
    order = np.argsort(np.asarray(whole_mask), axis=1, kind="stable")
    whole = jnp.take_along_axis(whole, jnp.asarray(order), axis=1)
    whole_mask = jnp.take_along_axis(whole_mask, jnp.asarray(order), axis=1)
    options = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, num_samples=2)
    config = SamplingConfig(**options)
    rng = jax.random.PRNGKey(2)
    want = sample_jit(decoder, params, whole, whole_mask, rng, config)
    shared = sampler_lib.prefill_prefix_jit(decoder, params, prefix)
    got = sample_jit(decoder, params, suffix, suffix_mask, rng, config, prefix=shared)
    np.testing.assert_array_equal(got.completion_tokens, want.completion_tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
    # The rollout holds the whole prompt (padding between prefix and suffix),
    # and the learner recomputes its log-probs: PPO's ratio stays 1.
    batch = got.sequences()
    assert batch["tokens"].shape[1] == 40 + suffix.shape[1] + 12
    learner = token_logprobs(scanned, params, batch["tokens"], batch["input_mask"])
    completion = learner.logprobs[:, -12:] * got.completion_mask
    np.testing.assert_allclose(completion, got.logprobs, atol=5e-5)


def test_greedy_first_rows_decode_greedily():
    decoder, scanned, params = _setup("llama")
    tokens, mask = _prompts(scanned.config.vocab_size)
    greedy = _sample(decoder, params, tokens, mask, temperature=0.0)
    mixed = _sample(
        decoder, params, tokens, mask, temperature=1.0, num_samples=3, greedy_first=True
    )
    first = np.asarray(mixed.completion_tokens)[::3]
    np.testing.assert_array_equal(first, greedy.completion_tokens)
    np.testing.assert_allclose(np.asarray(mixed.logprobs)[::3], greedy.logprobs, atol=1e-5)
    sampling = np.asarray(mixed.sampling_logprobs).reshape(4, 3, -1)
    assert np.all(sampling[:, 0] == 0) and np.all(sampling[:, 1:] < 0)


def _sorted_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The textbook top-k then top-p filter, by sorting (float64)."""
    out = logits.astype(np.float64)
    for row in out:
        if top_k:
            row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
        if top_p < 1:
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            ordered = np.sort(probs)[::-1]
            last = np.argmax(np.cumsum(ordered) >= top_p)  # first index reaching top_p
            row[probs < ordered[last]] = -np.inf
    return out


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (0, 0.95), (40, 0.9), (1, 1.0)])
def test_filter_matches_sorting(top_k, top_p):
    rng = np.random.default_rng(top_k + int(100 * top_p))
    # Rounded logits make ties at the boundary common; some rows carry -inf already.
    logits = np.round(rng.normal(0, 2, (64, 300)), 1).astype(np.float32)
    logits[::7, :50] = -np.inf
    got = np.asarray(
        sampler_lib._filter_logits(jnp.asarray(logits), SamplingConfig(top_k=top_k, top_p=top_p))
    )
    want = _sorted_filter(logits, top_k, top_p)
    mismatch = np.isfinite(got) != np.isfinite(want)
    # Only a row whose nucleus mass lands within float32 rounding of top_p may differ.
    assert mismatch.any(axis=1).sum() <= 1, np.nonzero(mismatch)


def test_categorical_draws_follow_the_distribution():
    probs = np.asarray([0.6, 0.0, 0.25, 0.1, 0.05])
    keys = jax.random.split(jax.random.PRNGKey(3), 20000)
    logits = jnp.repeat(jnp.log(jnp.asarray(probs, jnp.float32))[None], 20000, 0)
    draws = np.asarray(sampler_lib._categorical(keys, jnp.exp(logits)))
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / 20000, probs, atol=0.01)
    assert not (draws == 1).any()  # a zero-probability token is never drawn


def test_eos_stop_sequences_and_early_exit():
    decoder, scanned, params = _setup("llama")
    tokens, mask = _prompts(scanned.config.vocab_size)
    free = np.asarray(_sample(decoder, params, tokens, mask, temperature=0.0).completion_tokens)
    eos = int(free[0, 3])
    stop = tuple(int(t) for t in free[1, 1:3])
    got = _sample(
        decoder,
        params,
        tokens,
        mask,
        temperature=0.0,
        eos_ids=(eos,),
        stop_sequences=(stop,),
        pad_id=0,
    )
    first_eos = lambda row: int(np.argmax(free[row] == eos)) if eos in free[row] else None
    assert int(got.finish_reason[0]) == EOS and int(got.lengths[0]) == first_eos(0) + 1
    assert int(got.finish_reason[1]) in (EOS, STOP)
    if int(got.finish_reason[1]) == STOP:
        n = int(got.lengths[1])
        assert tuple(np.asarray(got.completion_tokens[1, n - 2 : n])) == stop
    for row in range(4):  # after the end: pads, no mask, no log-prob
        n = int(got.lengths[row])
        np.testing.assert_array_equal(got.completion_tokens[row, :n], free[row, :n])
        assert np.all(np.asarray(got.completion_tokens[row, n:]) == 0)
        assert not np.any(got.completion_mask[row, n:]) and np.all(got.logprobs[row, n:] == 0)
    # Every row ends at once when every token is an EOS: the loop stops after one step.
    everything = tuple(range(scanned.config.vocab_size))
    one = _sample(
        decoder, params, tokens, mask, temperature=0.0, max_new_tokens=64, eos_ids=everything
    )
    assert np.all(one.lengths == 1) and np.all(one.decode_steps == 1)


def _step_conditioned(decoder, params, tokens, mask, vocab, **options):
    """A greedy rollout with a step token after any of the tokens the free rollout writes
    early (so that steps start often)."""
    free = _sample(decoder, params, tokens, mask, temperature=0.0, max_new_tokens=16)
    free = np.asarray(free.completion_tokens)
    starts = tuple(sorted({int(t) for t in free[:, 1:4].ravel()}))
    given = next(t for t in range(vocab - 1, 0, -1) if t not in starts)
    options = dict(
        temperature=0.0, max_new_tokens=16, step_token=given, step_starts=starts, **options
    )
    return _sample(decoder, params, tokens, mask, **options), starts, given


def test_step_conditioning_gives_the_step_token_after_every_step_start():
    """Dense RCRL's conditioning: after each step-start token the next one is given; the
    others are still the full forward's argmax of everything before them, given tokens
    included, and given tokens score 0."""
    decoder, scanned, params = _setup("llama")
    tokens, mask = _prompts(scanned.config.vocab_size)
    got, starts, given = _step_conditioned(decoder, params, tokens, mask, scanned.config.vocab_size)
    out = np.asarray(got.completion_tokens)
    is_given = np.zeros(out.shape, bool)
    is_given[:, 1:] = np.isin(out[:, :-1], starts)
    assert is_given[:, :-1].sum() >= 4, "too few step starts to test anything"
    assert np.all(out[is_given] == given)
    assert np.all(np.asarray(got.logprobs)[is_given] == 0)
    seq = got.sequences()
    learner = token_logprobs(scanned, params, seq["tokens"], seq["input_mask"])
    width = tokens.shape[1]
    chosen = ~is_given
    assert np.all(np.asarray(learner.is_argmax)[:, width:][chosen])
    np.testing.assert_allclose(
        np.asarray(learner.logprobs)[:, width:][chosen],
        np.asarray(got.logprobs)[chosen],
        atol=2e-5,
    )


def test_given_step_tokens_are_invisible_to_stop_sequences():
    """A stop sequence ("\\nQuestion:") still ends a sample with a step token inside it."""
    decoder, scanned, params = _setup("llama")
    tokens, mask = _prompts(scanned.config.vocab_size)
    vocab = scanned.config.vocab_size
    free, starts, given = _step_conditioned(decoder, params, tokens, mask, vocab)
    row = np.asarray(free.completion_tokens)[0]
    at = int(np.flatnonzero(np.isin(row[:-2], starts))[0])  # row[at + 1] is the given token
    stop = (int(row[at]), int(row[at + 2]))
    got, _, _ = _step_conditioned(
        decoder, params, tokens, mask, vocab, stop_sequences=(stop,), min_rows=0
    )
    assert int(got.finish_reason[0]) == STOP and int(got.lengths[0]) == at + 3
    np.testing.assert_array_equal(got.completion_tokens[0, : at + 3], row[: at + 3])


def test_step_conditioning_options_are_checked():
    with pytest.raises(ValueError, match="step_token and step_starts"):
        SamplingConfig(step_token=5)
    with pytest.raises(ValueError, match="step_token and step_starts"):
        SamplingConfig(step_starts=(3,))
    with pytest.raises(ValueError, match="step_token and step_starts"):
        SamplingConfig(step_token=3, step_starts=(3, 4))


@pytest.fixture(scope="module")
def tokenizer():
    texts = [ex["question"] + "\n" + ex["answer"] for ex in synthetic.generate("train", 200)]
    return tokenizer_lib.train_tokenizer(texts, vocab_size=300)


@pytest.mark.parametrize("name", CONFIGS)
def test_shrinking_the_decode_batch_changes_nothing(name):
    """Moving the live rows into smaller batches as others finish gives the same rollout."""
    decoder, scanned, params = _setup(name)
    tokens, mask = _prompts(scanned.config.vocab_size)
    options = dict(
        max_new_tokens=12,
        temperature=1.0,
        num_samples=4,
        greedy_first=True,
        eos_ids=tuple(range(3, scanned.config.vocab_size, 4)),  # rows end at many steps
    )
    whole = _sample(decoder, params, tokens, mask, min_rows=0, **options)
    shrunk = _sample(decoder, params, tokens, mask, min_rows=2, **options)  # 16 -> 4 -> 2 rows
    fields = ("completion_tokens", "completion_mask", "lengths", "finish_reason", "decode_steps")
    for field in fields:
        np.testing.assert_array_equal(getattr(shrunk, field), getattr(whole, field))
    np.testing.assert_allclose(shrunk.logprobs, whole.logprobs, atol=1e-5)
    np.testing.assert_allclose(shrunk.sampling_logprobs, whole.sampling_logprobs, atol=1e-5)
    lengths = np.sort(np.asarray(whole.lengths))
    assert lengths[11] < lengths[-1], "no row outlived the first 12: the 4-row loop never ran"
    assert lengths[13] < lengths[-1], "no row outlived the first 14: the 2-row loop never ran"


def _engine_setup(tokenizer, **kwargs):
    config = tiny_llama(vocab_size=len(tokenizer))
    tokens = jnp.zeros((1, 2), jnp.int32)
    params = nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens))
    kwargs.setdefault("truncate_prompts", True)  # raw questions, some over the 64 bucket
    return Sampler(config, tokenizer, **kwargs), params


PROMPTS = [ex["question"] for ex in synthetic.generate("test", 6)]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_sampling_equals_unsharded(tokenizer, mesh_shape):
    plain, params = _engine_setup(tokenizer, batch_size=8, prompt_buckets=(64,))
    mesh = mesh_lib.make_mesh(mesh_shape)
    sharded, _ = _engine_setup(tokenizer, batch_size=8, prompt_buckets=(64,), mesh=mesh)
    # Many EOS ids: rows end at different steps, and the 16 rows shrink to 8.
    eos = tuple(range(3, len(tokenizer), 4))
    config = plain.sampling_config(max_new_tokens=6, temperature=1.0, num_samples=2, eos_ids=eos)
    rng = jax.random.PRNGKey(3)
    want = plain.generate(params, PROMPTS, rng, config)
    got = sharded.generate(params, PROMPTS, rng, config)
    np.testing.assert_array_equal(got.rollout.completion_tokens, want.rollout.completion_tokens)
    np.testing.assert_allclose(got.rollout.logprobs, want.rollout.logprobs, atol=2e-5)
    assert got.texts == want.texts
    lengths = np.sort(want.rollout.lengths)
    assert lengths[3] < lengths[-1], "fewer than 4 rows ended early: the batch never shrank"


def test_the_run_config_sets_where_the_decode_batch_stops_shrinking(tokenizer):
    from rl_reason.experiments import config as config_lib, rollout

    config = config_lib.rl_config("grpo")
    config.sampling.min_rows = 32
    model_config = tiny_llama(vocab_size=len(tokenizer))
    sampler = rollout.run_sampler(config, model_config, tokenizer, None, None)
    assert sampler.sampling_config().min_rows == 32
    mesh = mesh_lib.make_mesh((8, 1, 1))  # 8 batch shards: a multiple of them
    config.sampling.update(min_rows=12, batch_size=8)
    sampler = rollout.run_sampler(config, model_config, tokenizer, mesh, None)
    assert sampler.sampling_config().min_rows == 24


def test_engine_rejects_min_rows_that_do_not_split_over_the_mesh(tokenizer):
    engine, params = _engine_setup(tokenizer, batch_size=8, mesh=mesh_lib.make_mesh((2, 2, 2)))
    config = dataclasses.replace(engine.sampling_config(max_new_tokens=2), min_rows=6)
    with pytest.raises(ValueError, match="min_rows=6 is not a multiple of the mesh's 4 batch"):
        engine.generate(params, PROMPTS, jax.random.PRNGKey(0), config)


def test_a_policy_with_a_value_head_samples_with_its_starts_program(tokenizer):
    """Sampling reads only the logits: a PPO policy (its start plus a value head) draws
    what its start draws, with the program compiled for the start (the study in
    miniature compiled each sampling program again for every model with a head)."""
    from rl_reason.algorithms.orm import add_head

    start, params = _engine_setup(tokenizer, batch_size=4, prompt_buckets=(64,))
    with_head, policy_config = add_head(params, start.model_config, "value", jax.random.PRNGKey(9))
    policy = Sampler(
        policy_config, tokenizer, batch_size=4, prompt_buckets=(64,), truncate_prompts=True
    )
    config = start.sampling_config(max_new_tokens=5, temperature=1.0, num_samples=2)
    rng = jax.random.PRNGKey(4)
    want = start.generate(params, PROMPTS[:4], rng, config)
    programs = sample_jit._cache_size()
    got = policy.generate(with_head, PROMPTS[:4], rng, config)
    assert sample_jit._cache_size() == programs
    for field in ("completion_tokens", "logprobs", "sampling_logprobs", "lengths"):
        np.testing.assert_array_equal(getattr(got.rollout, field), getattr(want.rollout, field))


def test_engine_compiler_options_reach_the_sampler_and_keep_its_results(tokenizer):
    plain, params = _engine_setup(tokenizer, batch_size=4, prompt_buckets=(64,))
    # XLA:CPU's other matmul library (BENCHMARKS.md): the same program, other kernels.
    options = sampler_lib.CPU_XNNPACK_DOTS
    tuned, _ = _engine_setup(
        tokenizer, batch_size=4, prompt_buckets=(64,), compiler_options=options
    )
    config = plain.sampling_config(max_new_tokens=5, temperature=1.0, num_samples=2)
    rng = jax.random.PRNGKey(5)
    want = plain.generate(params, PROMPTS[:4], rng, config)
    got = tuned.generate(params, PROMPTS[:4], rng, config)
    np.testing.assert_array_equal(got.rollout.completion_tokens, want.rollout.completion_tokens)
    np.testing.assert_allclose(got.rollout.logprobs, want.rollout.logprobs, atol=1e-5)
    bad, _ = _engine_setup(tokenizer, batch_size=4, compiler_options={"xla_no_such_option": 1})
    with pytest.raises(Exception, match="xla_no_such_option"):
        bad.generate(params, PROMPTS[:4], rng, config)


def test_engine_batches_buckets_and_decodes(tokenizer):
    engine, params = _engine_setup(tokenizer, batch_size=4, prompt_buckets=(48, 96))
    config = engine.sampling_config(max_new_tokens=5, temperature=0.0, num_samples=2)
    rng = jax.random.PRNGKey(0)
    out = engine.generate(params, PROMPTS, rng, config)  # 6 prompts: batches of 4 + (2 + 2 empty)
    assert out.rollout.completion_tokens.shape == (12, 5)
    assert len(out.texts_per_prompt()) == 6
    assert out.texts[0] == tokenizer.decode(
        out.rollout.completion_tokens[0], skip_special_tokens=True
    )
    # A prompt's samples do not depend on its batch, bucket or neighbours.
    alone = _engine_setup(tokenizer, batch_size=4, prompt_buckets=(96,))[0]
    single = alone.generate(params, PROMPTS[5:], rng, config)
    np.testing.assert_array_equal(
        single.rollout.completion_tokens[:2], out.rollout.completion_tokens[10:]
    )
    assert pick_bucket(30, (48, 96)) == 48 and pick_bucket(50, (48, 96)) == 96


def test_engine_shares_a_common_prompt_prefix(tokenizer):
    shots = "".join(
        ex["question"] + "\n" + ex["answer"] + "\n\n" for ex in synthetic.generate("train", 2)
    )
    prompts = [shots + q for q in PROMPTS]
    ids = Sampler(tiny_llama(), tokenizer).token_ids(prompts)
    assert common_prefix_length(ids) >= 32
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps a token
    config = dict(batch_size=4, prompt_buckets=(32, 64, 128, 512))
    whole, params = _engine_setup(tokenizer, min_shared_prefix=0, **config)
    shared, _ = _engine_setup(tokenizer, **config)
    mesh = mesh_lib.make_mesh((2, 2, 2))
    sharded, _ = _engine_setup(tokenizer, mesh=mesh, **config)
    options = whole.sampling_config(max_new_tokens=6, temperature=1.0, num_samples=2)
    rng = jax.random.PRNGKey(4)
    want = whole.generate(params, prompts, rng, options)
    for engine in (shared, sharded):
        got = engine.generate(params, prompts, rng, options)
        np.testing.assert_array_equal(got.rollout.completion_tokens, want.rollout.completion_tokens)
        assert got.texts == want.texts
    # Whole prompts, padding between the shared prefix and each suffix.
    got_prompts = [
        t[m].tolist() for t, m in zip(got.rollout.prompt_tokens, got.rollout.prompt_mask)
    ]
    assert got_prompts[::2] == ids


def test_engine_cuts_text_at_stop_strings(tokenizer):
    engine, params = _engine_setup(
        tokenizer, batch_size=2, prompt_buckets=(64,), stop_strings=("Question:",)
    )
    config = engine.sampling_config(max_new_tokens=4, temperature=0.0)
    assert config.stop_sequences == (
        tuple(tokenizer("Question:", add_special_tokens=False)["input_ids"]),
    )
    from rl_reason.sampling.sampler import Rollout

    text_ids = tokenizer(" 12 apples.\nQuestion: next", add_special_tokens=False)["input_ids"]
    n = len(text_ids)
    fake = Rollout(
        prompt_tokens=np.zeros((1, 1)),
        prompt_mask=np.ones((1, 1), bool),
        completion_tokens=np.asarray([text_ids]),
        completion_mask=np.ones((1, n), bool),
        logprobs=np.zeros((1, n)),
        sampling_logprobs=np.zeros((1, n)),
        lengths=np.asarray([n]),
        finish_reason=np.asarray([STOP]),
        decode_steps=np.asarray([n]),
    )
    assert engine.decode(fake) == [" 12 apples.\n"]


def test_an_over_long_prompt_is_refused_unless_truncation_is_asked(tokenizer, caplog):
    """The sampler does not train on cut prompts behind the caller's back: a prompt over
    the largest bucket is an error naming its length and the bucket; truncate_prompts
    cuts its start with a warning. Stop strings default to the task template's."""
    from rl_reason.data import templates
    from rl_reason.sampling.engine import PromptTooLongError

    # No shared prefix to prefill apart: the whole prompt meets the bucket.
    strict, params = _engine_setup(
        tokenizer, batch_size=2, prompt_buckets=(8,), truncate_prompts=False, min_shared_prefix=0
    )
    assert strict.stop_strings == templates.STOP_SEQUENCES
    long_prompt = "Question: " + "one two three four five six seven eight nine ten " * 2
    length = len(strict.token_ids([long_prompt])[0])
    with pytest.raises(
        PromptTooLongError, match=f"largest prompt bucket \\(8 tokens\\).* has {length}"
    ):
        strict.generate(
            params, [long_prompt], jax.random.PRNGKey(0), strict.sampling_config(max_new_tokens=2)
        )
    cutting, _ = _engine_setup(tokenizer, batch_size=2, prompt_buckets=(8,), stop_strings=())
    assert cutting.stop_strings == ()
    tokens, mask = cutting.pad(cutting.token_ids([long_prompt]))
    assert tokens.shape == (1, 8) and mask.all() and "their starts are cut" in caplog.text

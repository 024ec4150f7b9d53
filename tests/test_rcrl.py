"""RCRL: return tokens in the vocabulary and the embedding, conditioned pairs, the loss mask."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rl_reason.algorithms import rcrl, sft
from rl_reason.algorithms import train_state as ts
from rl_reason.data import sft as sft_data
from rl_reason.data import synthetic, templates
from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.models.config import tiny_llama
from rl_reason.models.transformer import Transformer, default_positions, unstack_layers
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from rl_reason.rewards.functions import StepMatch
from rl_reason.rewards.steps import split_steps
from rl_reason.sampling.engine import Sampler

PROMPT = templates.format_prompt("Ann has 2 apples. Then Ann gets 3 more apples. How many?")
REFERENCE = "Ann has 2+3=<<2+3=5>>5 apples.\nAnn has 5*2=<<5*2=10>>10 apples.\n#### 10"
# Step 1 reaches the reference's 5; step 2's note is wrong (5*2 is not 11); step 3 just answers.
SAMPLE = " Ann has 2+3=<<2+3=5>>5 apples.\nAnn has 5*2=<<5*2=11>>11 apples.\n#### 11"


@pytest.fixture(scope="module")
def tokenizer():
    train = synthetic.generate("train", 100)
    texts = [ex["question"] + "\n" + ex["answer"] for ex in train]
    return tokenizer_lib.train_tokenizer(texts, 300)


def _init(config):
    tokens = jnp.zeros((1, 2), jnp.int32)
    return jax.device_get(
        nn.meta.unbox(jax.jit(Transformer(config).init)(jax.random.PRNGKey(0), tokens, tokens))
    )


def _forward_logits(config, params, tokens):
    """Float32 logits [B, T, V] of one forward pass."""

    def run(params, tokens):
        model = Transformer(config)
        mask = jnp.ones(tokens.shape, bool)
        out = model.apply(params, tokens, default_positions(mask), mask)
        return model.apply(params, out.hidden, method=Transformer.logits)

    return np.asarray(jax.jit(run)(params, tokens))


# ----------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize("tied", [True, False])
def test_add_return_tokens_grows_vocab_with_mean_rows(tokenizer, tied):
    old_len = len(tokenizer)
    config = tiny_llama(vocab_size=old_len, hidden_dim=32, tie_embeddings=tied)
    params = _init(config)
    if not tied:  # the untied model is checked in the unrolled (decoding) layout
        config = config.replace(scan_layers=False)
        params = unstack_layers(params)
    text = PROMPT + SAMPLE
    old_ids = tokenizer(text)["input_ids"]

    tok, new_params, new_config = rcrl.add_return_tokens(tokenizer, params, config)
    good, bad = rcrl.return_token_ids(tok)
    assert (good, bad) == (old_len, old_len + 1)
    assert len(tokenizer) == old_len  # the argument is not mutated
    assert new_config.vocab_size == old_len + 2 and config.vocab_size == old_len
    assert tok(text)["input_ids"] == old_ids  # every old id is stable
    assert tok(rcrl.condition_prompt(PROMPT, rcrl.GOOD))["input_ids"] == (
        tokenizer(PROMPT)["input_ids"] + [good]
    )
    assert tok.decode([good, bad]) == rcrl.GOOD + rcrl.BAD
    assert tok.decode([good, bad], skip_special_tokens=True) == ""

    table = new_params["params"]["embedder"]["embedding"]
    old_table = params["params"]["embedder"]["embedding"]
    chex.assert_shape(table, (old_len + 2, 32))
    chex.assert_trees_all_equal(table[:old_len], old_table)
    mean_row = np.broadcast_to(old_table.mean(0), (2, 32))
    chex.assert_trees_all_close(table[old_len:], mean_row, atol=1e-6)
    if not tied:
        head = new_params["params"]["lm_head"]
        chex.assert_shape(head, (32, old_len + 2))
        chex.assert_trees_all_equal(head[:, :old_len], params["params"]["lm_head"])
        mean_column = params["params"]["lm_head"].mean(1)[:, None]
        chex.assert_trees_all_close(
            head[:, old_len:], np.broadcast_to(mean_column, (32, 2)), atol=1e-6
        )
    rest = lambda p: {k: v for k, v in p["params"].items() if k not in ("embedder", "lm_head")}
    chex.assert_trees_all_equal(rest(new_params), rest(params))

    # A prompt without return tokens: the same logits for the old vocabulary.
    tokens = jnp.asarray([old_ids[:40]], jnp.int32)
    before = _forward_logits(config, params, tokens)
    after = _forward_logits(new_config, new_params, tokens)
    chex.assert_shape(after, (1, 40, old_len + 2))
    chex.assert_trees_all_close(after[..., :old_len], before, atol=1e-5)

    # Idempotent: nothing changes a second time.
    tok2, params2, config2 = rcrl.add_return_tokens(tok, new_params, new_config)
    assert tok2 is tok and params2 is new_params and config2 == new_config


def test_add_return_tokens_to_a_model_that_lacks_rows_or_has_spare_ones(tokenizer):
    old_len = len(tokenizer)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(old_len, 8)).astype(np.float32)
    config = tiny_llama(vocab_size=old_len, hidden_dim=8)
    params = {"params": {"embedder": {"embedding": table}}}
    tok, _, _ = rcrl.add_return_tokens(tokenizer, params, config)
    # The tokenizer saved with a run has the tokens; fresh base weights do not.
    same_tok, grown, grown_config = rcrl.add_return_tokens(tok, params, config)
    assert same_tok is tok and grown_config.vocab_size == old_len + 2
    grown_rows = grown["params"]["embedder"]["embedding"][old_len:]
    np.testing.assert_allclose(grown_rows, [table.mean(0)] * 2, rtol=1e-6)
    # A padded embedding (more rows than the tokenizer has tokens, as Qwen2's):
    # the new ids fall on spare rows, which start as the mean of the real tokens'.
    padded = np.concatenate([table, rng.normal(size=(20, 8)).astype(np.float32)])
    padded_config = config.replace(vocab_size=old_len + 20)
    padded_params = {"params": {"embedder": {"embedding": padded}}}
    _, out, out_config = rcrl.add_return_tokens(tokenizer, padded_params, padded_config)
    result = np.asarray(out["params"]["embedder"]["embedding"])
    assert out_config.vocab_size == old_len + 20
    np.testing.assert_allclose(result[old_len : old_len + 2], [table.mean(0)] * 2, rtol=1e-6)
    np.testing.assert_array_equal(result[:old_len], table)
    np.testing.assert_array_equal(result[old_len + 2 :], padded[old_len + 2 :])


# ----------------------------------------------------------------------------- text


def test_condition_prompt_places_the_token_where_the_solution_starts():
    prompt = "Question: q\nAnswer:"
    assert rcrl.condition_prompt(prompt, rcrl.GOOD) == prompt + "<|good|>"
    few_shot = templates.format_prompt("q2", [{"question": "q1", "answer": "a\n#### 1"}])
    conditioned = rcrl.condition_prompt(few_shot, rcrl.BAD)
    assert conditioned == few_shot + rcrl.BAD and conditioned.count(rcrl.BAD) == 1
    assert rcrl.condition_prompt("no marker", rcrl.GOOD) == "no marker<|good|>"
    assert rcrl.strip_return_tokens(conditioned) == few_shot


def test_dense_labels_per_step_on_a_three_step_solution():
    (dense,) = StepMatch()([SAMPLE], {"answer": [REFERENCE]})
    rewards = rcrl.per_step_rewards(SAMPLE, dense)
    assert rewards == (0.5, 0.0, 0.0)  # one of the reference's two results, in step 1
    sample = rcrl.RcrlSample(PROMPT, SAMPLE, reward=0.0, step_rewards=rewards)
    prompt, completion = rcrl.conditioned_pair(sample, "dense", threshold=0.5)
    assert prompt == PROMPT + rcrl.GOOD
    assert completion == (
        " Ann has 2+3=<<2+3=5>>5 apples.\n<|bad|>Ann has 5*2=<<5*2=11>>11 apples.\n<|bad|>#### 11"
    )
    unconditioned = PROMPT + templates.format_completion(SAMPLE)
    assert rcrl.strip_return_tokens(prompt + completion) == unconditioned
    # ORM step scores are paid at the step ends too: each step gets its own score.
    ends = [s.end for s in split_steps(SAMPLE)]
    assert rcrl.per_step_rewards(SAMPLE, list(zip(ends, [0.9, 0.4, 0.7]))) == (0.9, 0.4, 0.7)
    _, completion = rcrl.conditioned_pair(
        rcrl.RcrlSample(PROMPT, SAMPLE, 0.0, (0.9, 0.4, 0.7)), "dense", threshold=0.5
    )
    later_steps = completion.split("\n")[1:]
    assert later_steps[0].startswith(rcrl.BAD) and later_steps[1].startswith(rcrl.GOOD)
    # Sparse: one token for the whole solution, from its reward.
    assert rcrl.conditioned_pair(sample, "sparse", threshold=1.0) == (
        PROMPT + rcrl.BAD,
        templates.format_completion(SAMPLE),
    )
    with pytest.raises(ValueError, match="3 steps, 2 rewards"):
        short = rcrl.RcrlSample(PROMPT, SAMPLE, 0.0, (1.0, 0.0))
        rcrl.conditioned_pair(short, "dense", threshold=0.5)
    with pytest.raises(ValueError, match="mode"):
        rcrl.conditioned_pair(sample, "medium", threshold=0.5)
    # No steps (an empty solution): labelled by its reward.
    empty = rcrl.RcrlSample(PROMPT, "", 1.0, ())
    assert rcrl.conditioned_pair(empty, "dense", threshold=1.0)[0] == PROMPT + rcrl.GOOD


# ----------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_rcrl_arrays_mask_the_return_tokens_out_of_the_loss(tokenizer, mode):
    config = tiny_llama(vocab_size=len(tokenizer), hidden_dim=8)
    params = {"params": {"embedder": {"embedding": np.zeros((len(tokenizer), 8), np.float32)}}}
    tok, _, _ = rcrl.add_return_tokens(tokenizer, params, config)
    return_ids = rcrl.return_token_ids(tok)
    samples = [
        rcrl.RcrlSample(PROMPT, SAMPLE, 0.0, (0.5, 0.0, 0.0)),
        rcrl.RcrlSample(PROMPT, " " + REFERENCE, 1.0, (0.5, 0.5, 0.0)),
    ]
    threshold = 0.5 if mode == "dense" else 1.0
    arrays, truncated = rcrl.rcrl_arrays(tok, samples, 160, mode, threshold=threshold)
    assert truncated == 0
    chex.assert_shape(arrays["tokens"], (2, 160))
    is_return = np.isin(arrays["tokens"], return_ids)
    assert not (arrays["loss_mask"] & is_return).any()
    # Every token the unconditioned SFT pair trains on is still trained on.
    for row, sample in enumerate(samples):
        completion = templates.format_completion(sample.completion)
        plain, _ = sft_data.pack_pairs(
            [sft_data.encode_pair(tok, sample.prompt, completion)], 160, tok.pad_token_id
        )
        targets = arrays["tokens"][row][arrays["loss_mask"][row]]
        np.testing.assert_array_equal(targets, plain["tokens"][0][plain["loss_mask"][0]])
        prompt_length = len(sft_data.encode_pair(tok, sample.prompt, "")[0])
        first = return_ids[0] if row or mode == "dense" else return_ids[1]  # row 0 sparse is bad
        assert arrays["tokens"][row, prompt_length] == first
        inner = is_return[row, prompt_length + 1 :].sum()
        assert inner == (2 if mode == "dense" else 0)
    assert arrays["tokens"][0][is_return[0]].tolist() == (
        [return_ids[0], return_ids[1], return_ids[1]] if mode == "dense" else [return_ids[1]]
    )
    with pytest.raises(ValueError, match="add_return_tokens"):
        rcrl.rcrl_arrays(tokenizer, samples, 160, mode, threshold=0.5)


# ----------------------------------------------------------------------------- labelling


def test_label_samples_keeps_good_and_bad_and_cuts_after_the_answer():
    rambling = SAMPLE + "\nAnn has 11 apples. Ann has 11 apples."
    labelled = rcrl.label_samples(
        [3, 3], [PROMPT, PROMPT], [rambling, " " + REFERENCE], [0.0, 1.0], round=2
    )
    assert [s.reward for s in labelled] == [0.0, 1.0]  # RCRL keeps the bad sample too
    assert labelled[0].completion == SAMPLE  # cut at its "#### 11" line
    assert labelled[1] == rcrl.RcrlSample(PROMPT, " " + REFERENCE, 1.0, None, 3, 2)
    assert rcrl.label_summary(labelled, threshold=1.0) == {"good_fraction": 0.5}
    uncut = rcrl.label_samples([3], [PROMPT], [rambling], [0.0], round=2, cut=False)
    assert uncut[0].completion == rambling
    with pytest.raises(ValueError, match="rewards has 1 entries for 2"):
        rcrl.label_samples([3, 3], [PROMPT, PROMPT], [SAMPLE, SAMPLE], [0.0], round=0)


def test_dense_labels_are_the_step_rewards_of_the_stored_text():
    rambling = SAMPLE + "\nAnn has 5*2=<<5*2=10>>10 apples."  # a matching step after the answer
    seen = []

    def step_rewards(texts):
        seen.extend(texts)
        return [pairs for pairs in StepMatch()(texts, {"answer": [REFERENCE] * len(texts)})]

    (sample,) = rcrl.label_samples(
        [0], [PROMPT], [rambling], [0.0], round=0, step_rewards_fn=step_rewards
    )
    assert seen == [SAMPLE]  # judged as stored, after the cut
    assert sample.step_rewards == (0.5, 0.0, 0.0)
    summary = rcrl.label_summary([sample], threshold=1.0, step_threshold=1e-6)
    assert summary == {"good_fraction": 0.0, "good_step_fraction": pytest.approx(1 / 3)}
    _, completion = rcrl.conditioned_pair(sample, "dense", threshold=1e-6)
    assert completion.count(rcrl.BAD) == 2


def test_rcrl_samples_are_stored_like_ei_datasets():
    from rl_reason.algorithms import expert_iteration as ei

    samples = (
        rcrl.RcrlSample(PROMPT, SAMPLE, 0.0, (0.5, 0.0, 0.0), question_id=4, round=1),
        rcrl.RcrlSample(PROMPT, " " + REFERENCE, 1.0, None, question_id=5, round=0),
    )
    data = ei.to_jsonl(samples, rcrl.RcrlSample)
    assert ei.from_jsonl(data, rcrl.RcrlSample) == samples
    assert ei.to_jsonl(ei.from_jsonl(data, rcrl.RcrlSample), rcrl.RcrlSample) == data
    with pytest.raises(ValueError, match="line 1: not an rl_reason.expert_iteration"):
        ei.from_jsonl(data)  # an RCRL file is not read as EI solutions
    with pytest.raises(ValueError, match="fields"):
        rcrl.RcrlSample.from_json({"prompt": PROMPT})
    # Accumulated and deduplicated per question like EI's solutions.
    dataset, summary = ei.accumulate(samples, [samples[0], samples[1]])
    assert dataset == samples and summary.duplicates == 2


def test_heldout_metrics_condition_every_prompt_on_the_token():
    from rl_reason.experiments import rollout
    from rl_reason.sampling.engine import Samples

    class Recorder:
        def sampling_config(self, **options):
            return options

        def generate(self, params, prompts, rng, config):
            self.prompts = list(prompts)
            k = config.get("num_samples", 1)
            return Samples(None, ["#### 10"] * (k * len(prompts)), k)

    questions = [{"question": "q1", "final_answer": "10"}, {"question": "q2", "final_answer": "3"}]
    sampler = Recorder()
    kwargs = {"num_samples": 2, "temperature": 1.0, "max_new_tokens": 8, "rng": None}
    out = rollout.heldout_metrics(sampler, None, questions, condition_on=rcrl.GOOD, **kwargs)
    assert sampler.prompts == [templates.format_prompt(q) + rcrl.GOOD for q in ("q1", "q2")]
    assert out["maj@1"] == 0.5
    rollout.heldout_metrics(sampler, None, questions, **kwargs)
    assert sampler.prompts == [templates.format_prompt(q) for q in ("q1", "q2")]


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_a_model_trained_on_labelled_samples_follows_the_return_token(tokenizer):
    """The RCRL path end to end at toy scale: return tokens added to a fresh model,
    each question's good sample (the reference) and bad one (a bare wrong guess, a
    different style) labelled by reward and trained on with `sft_step`; then greedy
    completions conditioned on <|good|> are the worked solutions and on <|bad|> the
    bare guesses. What the token does is learned from the labels alone."""
    examples = synthetic.generate("train", 8)
    samples = []
    for ex in examples:
        prompt = templates.format_prompt(ex["question"])
        guess = f" #### {int(ex['final_answer']) + 1}"
        samples += [
            rcrl.RcrlSample(prompt, " " + ex["answer"], 1.0, ()),
            rcrl.RcrlSample(prompt, guess, 0.0, ()),
        ]
    config = tiny_llama(vocab_size=len(tokenizer), hidden_dim=64, mlp_dim=128)
    tok, params, config = rcrl.add_return_tokens(tokenizer, _init(config), config)
    arrays, truncated = rcrl.rcrl_arrays(tok, samples, 256, "sparse", threshold=1.0)
    assert truncated == 0
    model = Transformer(config)
    tx = optax.adam(3e-3)
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state = ts.create_train_state(model, tx, mesh, shd.DEFAULT_RULES, 0, params=params)
    step = ts.jit_step(
        sft.make_sft_step(model, tx), mesh, shd.DEFAULT_RULES,
        ts.state_shardings(model, tx, mesh, shd.DEFAULT_RULES),
    )  # fmt: skip
    batch = shd.shard_batch(arrays, mesh)
    for _ in range(200):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.05, metrics

    sampler = Sampler(config, tok, batch_size=8, prompt_buckets=(256,))
    greedy = sampler.sampling_config(max_new_tokens=160, temperature=0.0)
    prompts = [templates.format_prompt(ex["question"]) for ex in examples]
    for token, want in ((rcrl.GOOD, [" " + ex["answer"] for ex in examples]),
                        (rcrl.BAD, [s.completion for s in samples[1::2]])):  # fmt: skip
        conditioned = [rcrl.condition_prompt(p, token) for p in prompts]
        got = sampler.generate(state.params, conditioned, jax.random.PRNGKey(0), greedy).texts
        assert [g.strip() for g in got] == [w.strip() for w in want], token

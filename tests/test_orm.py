"""The ORM: class-balanced loss, step (learning, accumulation, sharding), AUC, scorer, add_head.

One tiny model and one set of initial params serve every test (compiling an
initialiser costs seconds of CPU on XLA:CPU).
"""

import dataclasses
import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rl_reason.algorithms import optimizer, orm, sft
from rl_reason.algorithms import train_state as ts
from rl_reason.data import synthetic, templates
from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.experiments.config import base_config
from rl_reason.models.config import tiny_llama
from rl_reason.models.transformer import Transformer, unstack_layers
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from rl_reason.rewards.orm import OrmOutcome, OrmSteps
from rl_reason.rewards.steps import split_steps

VOCAB = 320  # >= the synthetic tokenizer's size
MARKER = 5  # a positive completion contains this token somewhere
CONFIG = tiny_llama(vocab_size=VOCAB, hidden_dim=32, heads=("orm",))
MODEL = Transformer(CONFIG)


def _init(model, seed=0):
    tokens = jnp.zeros((1, 2), jnp.int32)
    return nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), tokens, tokens))


@pytest.fixture(scope="module")
def params():
    return jax.device_get(_init(MODEL))


def _marker_batch(n, seed, length=16, prompt=4):
    """Right-padded sequences whose label is whether the completion holds MARKER."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(6, 64, (n, length)).astype(np.int32)
    labels = (np.arange(n) % 2).astype(np.float32)
    lengths = rng.integers(prompt + 3, length + 1, n)
    input_mask = np.arange(length)[None] < lengths[:, None]
    loss_mask = input_mask & (np.arange(length)[None] >= prompt)
    for row in np.flatnonzero(labels):
        tokens[row, rng.integers(prompt, lengths[row])] = MARKER
    return {"tokens": tokens, "input_mask": input_mask, "loss_mask": loss_mask, "labels": labels}


def _mesh(shape):
    return mesh_lib.make_mesh(shape, devices=jax.devices()[: int(np.prod(shape))])


def _run(params, batches, mesh_shape, tx, **options):
    """The params after each step and each step's metrics, the step jitted on a mesh."""
    mesh = _mesh(mesh_shape)
    state = ts.create_train_state(MODEL, tx, mesh, shd.DEFAULT_RULES, seed=0, params=params)
    step = ts.jit_step(
        orm.make_orm_step(MODEL, tx, **options),
        mesh,
        shd.DEFAULT_RULES,
        ts.state_shardings(MODEL, tx, mesh, shd.DEFAULT_RULES),
    )
    after, history = [], []
    for batch in batches:
        state, metrics = step(state, shd.shard_batch(batch, mesh))
        after.append(jax.device_get(state.params))
        history.append(jax.device_get(metrics))
    return after, history


# ----------------------------------------------------------------------------- loss


def test_class_balancing_on_a_hand_example(params):
    """1 positive sequence of 2 completion tokens, 2 negatives of 1 and 3 tokens.

    C = 2 classes, T_pos = 2, T_neg = 4: positive tokens weigh 1/(2*2) = 1/4,
    negative tokens 1/(2*4) = 1/8, so each class carries half the loss.
    """
    loss_mask = np.array([[0, 1, 1, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0]], bool)
    batch = {
        "tokens": np.array([[1, 7, 8, 0, 0], [1, 9, 10, 0, 0], [1, 11, 12, 13, 0]], np.int32),
        "input_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool),
        "loss_mask": loss_mask,
        "labels": np.array([1.0, 0.0, 0.0], np.float32),
    }
    normalizer = orm.class_normalizer(batch)
    chex.assert_trees_all_close(normalizer, jnp.array([8.0, 4.0]))
    loss, aux = jax.jit(orm.orm_loss, static_argnums=2)(params, batch, MODEL, normalizer)
    logits = jax.jit(orm.orm_logits, static_argnums=0)(
        MODEL, params, batch["tokens"], batch["input_mask"]
    )
    p = jax.nn.sigmoid(np.asarray(logits, np.float64))
    want = (
        -(np.log(p[0, 1]) + np.log(p[0, 2])) / 4
        - np.log(1 - p[1, 2]) / 8
        - (np.log(1 - p[2, 1]) + np.log(1 - p[2, 2]) + np.log(1 - p[2, 3])) / 8
    )
    chex.assert_trees_all_close(loss, jnp.float32(want), rtol=1e-5)
    assert aux["final_count"] == 3 and aux["token_count"] == 6
    # Each class's token weights sum to 1/2 whatever its size: a constant
    # prediction q then costs (-log q - log(1 - q)) / 2, least at q = 1/2.
    weights = loss_mask / np.asarray(normalizer)[batch["labels"].astype(int)][:, None]
    np.testing.assert_allclose([weights[0].sum(), weights[1:].sum()], [0.5, 0.5])


def test_one_class_batches_weigh_that_class_alone():
    batch = _marker_batch(4, seed=0)
    batch["labels"][:] = 1.0
    tokens = (batch["loss_mask"] & batch["input_mask"]).sum()
    chex.assert_trees_all_close(orm.class_normalizer(batch), jnp.array([1.0, tokens], jnp.float32))


def test_final_scores_read_the_last_completion_token():
    scores = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    loss_mask = jnp.array([[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], bool)
    got = orm.final_scores(scores, loss_mask)
    np.testing.assert_array_equal(got[:2], [2.0, 7.0])
    assert np.isnan(got[2])


def test_lm_auxiliary_loss_is_the_sft_loss_of_the_correct_solutions(params):
    """Cobbe et al.'s joint objective: BCE + w * (token-mean NLL of the positive rows'
    completions), the NLL exactly `sft_loss` on those rows alone."""
    batch = jax.tree.map(jnp.asarray, _marker_batch(6, seed=4))
    normalizer, lm_count = orm.class_normalizer(batch), orm.lm_normalizer(batch)
    loss_fn = jax.jit(orm.orm_loss, static_argnums=(2, 4, 5, 7))
    plain, _ = loss_fn(params, batch, MODEL, normalizer, "orm", 0.0, lm_count, 8)
    joint, aux = loss_fn(params, batch, MODEL, normalizer, "orm", 0.5, lm_count, 8)
    positive = {key: value[batch["labels"] > 0.5] for key, value in batch.items()}
    count = sft.target_weights(positive).sum()
    assert lm_count == count > 0
    nll, _ = jax.jit(sft.sft_loss, static_argnums=(2, 4))(params, positive, MODEL, count, 8)
    chex.assert_trees_all_close(aux["bce"], plain, rtol=1e-6)
    chex.assert_trees_all_close(joint, plain + 0.5 * nll, rtol=1e-5)
    chex.assert_trees_all_close(aux["lm_nll_sum"] / lm_count, nll, rtol=1e-5)


# ----------------------------------------------------------------------------- step


@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_sharded_accumulated_step_equals_single_device_full_batch_step(params, lm_weight):
    """Mesh (2, 2, 2) with 2 micro-batches == one device, one batch (with and without the
    language-modelling loss); a NaN drops `finite`."""
    batches = [_marker_batch(8, seed=s) for s in (2, 3)]
    batches[1]["labels"][:] = [1, 0, 0, 0, 0, 0, 1, 0]  # unbalanced, unevenly spread
    poisoned = {**batches[0], "labels": batches[0]["labels"].copy()}
    poisoned["labels"][0] = np.nan  # a broken label poisons the loss
    sgd = optax.sgd(0.5)  # parameters move by the gradient itself
    options = dict(lm_weight=lm_weight, chunk_size=8)
    one, m_one = _run(params, [*batches, poisoned], (1, 1, 1), sgd, **options)
    sharded, m_sharded = _run(params, batches, (2, 2, 2), sgd, num_microbatches=2, **options)
    for a, b in zip(m_one, m_sharded):
        assert ("lm_loss" in a) == (lm_weight > 0)
        keys = ("loss", "bce", "grad_norm", "final_accuracy", "mean_prediction")
        for key in (*keys, "positive_fraction"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=key)
        assert a["finite"] == b["finite"] == 1.0
    chex.assert_trees_all_close(one[1], sharded[1], atol=2e-5)
    assert m_one[2]["finite"] == 0.0


def test_orm_learns_to_separate_two_kinds_of_sequences(params):
    optim = base_config().optim
    optim.update(lr=3e-3, schedule="constant", warmup_steps=0, weight_decay=0.0)
    tx, schedule = optimizer.make_optimizer(optim, 100)
    held_out = _marker_batch(64, seed=999)

    def auc(p):
        scores = orm.orm_scores_jit(MODEL, p, held_out["tokens"], held_out["input_mask"])
        return orm.roc_auc(orm.final_scores(scores, held_out["loss_mask"]), held_out["labels"])

    trained, history = _run(
        params, [_marker_batch(32, seed=s) for s in range(80)], (1, 1, 1), tx, lr_schedule=schedule
    )
    assert all(m["finite"] == 1.0 for m in history)
    # Tokens before the marker cannot know the label, so the token loss stays
    # well above 0; the final score is what must separate the two kinds.
    assert history[-1]["loss"] < history[0]["loss"]
    assert auc(params) < 0.8 and auc(trained[-1]) > 0.9
    assert history[-1]["final_accuracy"] > 0.8


# ----------------------------------------------------------------------------- AUC


def test_balanced_within_questions_keeps_as_many_right_as_wrong_per_question():
    # q0: 2 right, 1 wrong; q1: all right; q2: 1 right, 3 wrong; q3: all wrong.
    question_ids = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    labels = [1, 0, 1, 1, 1, 0, 0, 1, 0, 0]
    keep = orm.balanced_within_questions(question_ids, labels)
    np.testing.assert_array_equal(keep, [0, 1, 5, 7])  # each question's first of each class
    kept = np.asarray(labels)[keep]
    for q in set(np.asarray(question_ids)[keep]):
        in_q = np.asarray(question_ids)[keep] == q
        assert kept[in_q].sum() * 2 == in_q.sum()
    assert orm.balanced_within_questions([0, 0], [1, 1]).size == 0
    # one_sided: the first samples of the questions all right (q1) or all wrong (q3) too.
    with_one = orm.balanced_within_questions(question_ids, labels, one_sided=1)
    np.testing.assert_array_equal(with_one, [0, 1, 3, 5, 7, 9])
    with pytest.raises(ValueError, match="3 question ids for 2 labels"):
        orm.balanced_within_questions([0, 0, 1], [1, 0])


def _brute_force_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_against_hand_and_brute_force():
    assert orm.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert orm.roc_auc([0.5, 0.5], [0, 1]) == 0.5  # a tie is half a win
    assert orm.roc_auc([1, 2, 3], [0, 1, 1]) == 1.0
    assert orm.roc_auc([3, 2, 1], [0, 1, 1]) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, 30).astype(float)  # many ties
        labels = rng.integers(0, 2, 30)
        labels[:2] = [0, 1]
        np.testing.assert_allclose(orm.roc_auc(scores, labels), _brute_force_auc(scores, labels))
    with pytest.raises(ValueError, match="both classes"):
        orm.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        orm.roc_auc([np.nan, 0.2], [0, 1])


def test_within_group_auc_pools_the_pairs_of_each_group():
    # Group 0: the positive outscores 1 of 3 negatives; group 1: one class only
    # (no pair); group 2: 2 positives x 2 negatives, 2 wins, a tie and a loss.
    scores = [0.5, 0.6, 0.4, 0.7, 0.9, 0.9, 0.9, 0.9, 0.3, 0.5, 0.2, 0.5]
    labels = [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert orm.within_group_auc(scores, labels, 4) == (1 + 2.5) / (3 + 4)
    # Scores that only know which group is the easy one: 3/4 overall, 1/2 within.
    easy = np.repeat([0.1, 0.9], 4)
    labels = [1, 0, 0, 0, 1, 1, 1, 0]
    assert orm.roc_auc(easy, labels) == 0.75 and orm.within_group_auc(easy, labels, 4) == 0.5
    rng = np.random.default_rng(1)
    scores, labels = rng.integers(0, 4, 40).astype(float), rng.integers(0, 2, 40)
    want = [
        (_brute_force_auc(s, y), y.sum() * (5 - y.sum()))
        for s, y in zip(scores.reshape(8, 5), labels.reshape(8, 5))
        if 0 < y.sum() < 5
    ]
    np.testing.assert_allclose(
        orm.within_group_auc(scores, labels, 5),
        sum(a * n for a, n in want) / sum(n for _, n in want),
    )
    with pytest.raises(ValueError, match="both classes"):
        orm.within_group_auc([0.1, 0.2], [1, 1], 2)


# ----------------------------------------------------------------------------- scorer


@pytest.fixture(scope="module")
def scored_setup(params):
    train = synthetic.generate("train", 100)
    tokenizer = tokenizer_lib.train_tokenizer(
        [ex["question"] + "\n" + ex["answer"] for ex in train], 300
    )
    assert len(tokenizer) <= VOCAB
    # A sharper head than the initial one, so that scores differ visibly.
    head = params["params"]["scalar_heads_orm"]
    sharp_head = {**head, "kernel": 30 * head["kernel"]}
    sharp = {**params, "params": {**params["params"], "scalar_heads_orm": sharp_head}}
    examples = synthetic.generate("train", 6, difficulty=synthetic.Difficulty(2, 3))
    prompts = [templates.format_prompt(ex["question"]) for ex in examples]
    prompts.append("Question: ?\nAnswer:")
    completions = [" " + ex["answer"] for ex in examples] + [""]
    return tokenizer, sharp, prompts, completions


def _direct(params, prefixes, length=256):
    """Each prefix scored on its own (right-padded, one batch): the score after its last token."""
    tokens = np.zeros((len(prefixes), length), np.int32)
    mask = np.zeros((len(prefixes), length), bool)
    for row, ids in enumerate(prefixes):
        tokens[row, : len(ids)], mask[row, : len(ids)] = ids, True
    scores = np.asarray(orm.orm_scores_jit(MODEL, params, tokens, mask))
    return [float(scores[row, len(ids) - 1]) for row, ids in enumerate(prefixes)]


def test_scorer_offsets_read_the_token_that_completes_the_prefix(scored_setup):
    tokenizer, params, prompts, completions = scored_setup
    offsets = [[0, 1, *(s.end for s in split_steps(text)), len(text) + 5] for text in completions]
    scorer = orm.BatchedOrmScorer(MODEL, params, tokenizer, batch_size=4, length_buckets=(64, 256))
    got = scorer(completions, {"prompt": prompts}, offsets)
    assert [len(row) for row in got] == [len(row) for row in offsets]
    prefixes = []
    for prompt, text, row_offsets in zip(prompts, completions, offsets):
        prompt_ids, completion_ids = orm.encode_for_orm(tokenizer, prompt, text)
        spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        for c in row_offsets:
            if c <= 0 or not completion_ids:  # nothing of the completion yet: after the prompt
                prefixes.append(prompt_ids)
                continue
            # The token that completes text[:c] starts before c and ends at or after it.
            k = max(i for i, (start, _) in enumerate(spans) if start < c)
            assert spans[k][1] >= min(c, len(text))
            prefixes.append(prompt_ids + completion_ids[: k + 1])
            if c < len(text) and text[c] == "\n":
                # At a step end these tokens are the step-end prefix's own tokens:
                # the score is the score of the text up to the step's end.
                assert tokenizer(text[:c], add_special_tokens=False)["input_ids"] == (
                    completion_ids[: k + 1]
                )
    np.testing.assert_allclose(sum(got, []), _direct(params, prefixes), atol=1e-5)
    # Different prefixes get different scores (the offsets are not all read at one place).
    assert len({round(s, 4) for s in got[0]}) > 3


def test_scorer_serves_the_orm_rewards_and_matches_training_arrays(scored_setup, params):
    tokenizer, sharp, prompts, completions = scored_setup
    scorer = orm.BatchedOrmScorer(MODEL, sharp, tokenizer, batch_size=4, length_buckets=(64, 256))
    outcome = OrmOutcome(scorer)(completions[:-1], {"prompt": prompts[:-1]})
    arrays, truncated = orm.orm_arrays(
        tokenizer, prompts[:-1], completions[:-1], [1.0] * len(outcome), 256
    )
    assert truncated == 0 and arrays["labels"].dtype == np.float32
    assert tokenizer.eos_token_id not in arrays["tokens"][arrays["loss_mask"]]
    trained_at = orm.final_scores(
        orm.orm_scores_jit(MODEL, sharp, arrays["tokens"], arrays["input_mask"]),
        arrays["loss_mask"],
    )
    # The score the ORM is trained to give at the last token is the sparse ORM reward.
    np.testing.assert_allclose(outcome, trained_at, atol=1e-5)
    dense = OrmSteps(scorer)(completions, {"prompt": prompts})
    assert [[o for o, _ in row] for row in dense] == [
        [s.end for s in split_steps(t)] for t in completions
    ]
    np.testing.assert_allclose([row[-1][1] for row in dense[:-1]], outcome, atol=1e-5)
    # Other params: the same compiled program, other scores.
    other = dataclasses.replace(scorer, params=params)
    assert OrmOutcome(other)(completions[:1], {"prompt": prompts[:1]}) != outcome[:1]


def test_scorer_on_a_mesh_equals_the_plain_scorer(scored_setup):
    tokenizer, params, prompts, completions = scored_setup
    mesh = _mesh((2, 2, 2))
    offsets = [[len(t) // 2, len(t)] for t in completions]
    plain = orm.BatchedOrmScorer(MODEL, params, tokenizer, batch_size=8, length_buckets=(256,))
    sharded = dataclasses.replace(
        plain, params=jax.device_put(params, NamedSharding(mesh, P())), mesh=mesh
    )
    batch = {"prompt": prompts}
    chex.assert_trees_all_close(
        sharded(completions, batch, offsets), plain(completions, batch, offsets), atol=1e-5
    )
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(plain, batch_size=6, mesh=mesh)


def test_scorer_cuts_overlong_inputs_from_the_left(scored_setup):
    tokenizer, params, prompts, completions = scored_setup
    scorer = orm.BatchedOrmScorer(MODEL, params, tokenizer, batch_size=4, length_buckets=(16,))
    text = completions[0]
    (row,) = scorer([text], {"prompt": [prompts[0]]}, [[len(text)]])
    prompt_ids, completion_ids = orm.encode_for_orm(tokenizer, prompts[0], text)
    (want,) = _direct(params, [(prompt_ids + completion_ids)[-16:]])
    np.testing.assert_allclose(row[0], want, atol=1e-5)


# ----------------------------------------------------------------------------- add_head


@pytest.mark.parametrize("scan_layers", [True, False])
def test_add_head_to_params_without_it(params, scan_layers):
    """Params without heads, as an importer returns them (scanned or unrolled)."""
    config = CONFIG.replace(heads=(), scan_layers=scan_layers)
    headless = {"params": {k: v for k, v in params["params"].items() if k != "scalar_heads_orm"}}
    if not scan_layers:
        headless = unstack_layers(headless)
    new_params, new_config = orm.add_head(headless, config, "orm", jax.random.PRNGKey(3))
    assert new_config.heads == ("orm",) and config.heads == ()
    # The tree the model with the head initialises; every old leaf untouched.
    fresh = jax.eval_shape(lambda: _init(Transformer(new_config)))
    chex.assert_trees_all_equal_shapes_and_dtypes(new_params, fresh)
    old = {k: v for k, v in new_params["params"].items() if k != "scalar_heads_orm"}
    chex.assert_trees_all_equal(old, headless["params"])
    head = new_params["params"]["scalar_heads_orm"]
    np.testing.assert_array_equal(head["bias"], 0.0)
    assert 0 < np.std(head["kernel"]) < 5 * config.init_std
    tokens = jnp.array([[1, 7, 8, 9]], jnp.int32)
    apply = jax.jit(lambda model, p: model.apply(p, tokens, jnp.arange(4)[None]), static_argnums=0)
    out = apply(Transformer(new_config), new_params)
    before = apply(Transformer(config), headless)
    chex.assert_shape(out.heads["orm"], (1, 4))
    chex.assert_tree_all_finite(out.heads["orm"])
    chex.assert_trees_all_close(out.hidden, before.hidden)
    # Idempotent; a second head joins the first.
    again, again_config = orm.add_head(new_params, new_config, "orm", jax.random.PRNGKey(4))
    assert again is new_params and again_config == new_config
    both, both_config = orm.add_head(new_params, new_config, "value", jax.random.PRNGKey(5))
    assert both_config.heads == ("orm", "value")
    assert both["params"]["scalar_heads_orm"] is head

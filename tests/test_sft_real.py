"""SFT on real GSM8K and SVAMP rows with a real model's tokenizer, from a Hugging Face start.

The start models are tiny random Llama and Qwen2 checkpoints written by
transformers, each saved with a tokenizer of its family's kind built here from
the data's text (no download): a SentencePiece-style BPE with byte fallback,
BOS and no pad token (Llama), and a byte-level BPE with no BOS whose pad is
its EOS (Qwen2). The loss masks are checked on every row, the real Gemma 3
tokenizer's too (slow), a few steps lower the loss, and a run stopped and
resumed, or SIGKILLed in a separate process and rerun (slow), ends bitwise
equal to an uninterrupted one.
"""

import copy
import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from rl_reason import checkpointing
from rl_reason.data import sources as data_sources
from rl_reason.data import templates
from rl_reason.experiments import config as config_lib
from rl_reason.experiments import runs, sft, sources
from rl_reason.models.hf_import import load_tokenizer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
import subprocess_runs

from configs import gemma3_270m_gsm8k_sft

DATA_DIR = data_sources.locate_data_dir()
pytestmark = pytest.mark.skipif(DATA_DIR is None, reason="real GSM8K/SVAMP files not found")

VOCAB = 1024
MAX_LENGTH = 512


def _texts():
    """GSM8K train and SVAMP rows as SFT text (prompt + solution): what the tokenizers learn."""
    rows = data_sources.read_gsm8k(DATA_DIR, "train")[:2000] + data_sources.read_svamp(DATA_DIR)
    return [
        templates.format_prompt(r["question"]) + templates.format_completion(r["answer"])
        for r in rows
    ]


def _llama_tokenizer(texts):
    """Llama's layout: SentencePiece-style pieces ("▁" for a space, split before it),
    <unk> <s> </s> = 0 1 2, then the 256 byte pieces <0x00>..<0xFF> that characters
    outside the vocabulary fall back to, BOS added, no pad token."""
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Metaspace(replacement="▁", prepend_scheme="first"),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 256, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    # The byte pieces are ordinary vocabulary entries (ids 3..258, as in Llama's), not
    # special tokens: a decode that skips special tokens keeps what they spell.
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    order = specials + [f"<0x{i:02X}>" for i in range(256)]
    order += [piece for piece, _ in learned if piece not in specials]
    spec["model"]["vocab"] = {piece: i for i, piece in enumerate(order)}
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return transformers.LlamaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# Qwen2's pre-tokenizer pattern (digits one by one).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _qwen2_tokenizer(texts):
    """Qwen2's layout: byte-level BPE after its regex split, no BOS, <|endoftext|> the
    EOS and the pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return transformers.Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


_SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
)
FAMILIES = {
    "llama": (
        _llama_tokenizer,
        lambda tok, **kw: transformers.LlamaConfig(
            vocab_size=len(tok), bos_token_id=1, eos_token_id=2, **_SMALL, **kw
        ),
    ),
    "qwen2": (
        _qwen2_tokenizer,
        lambda tok, **kw: transformers.Qwen2Config(
            vocab_size=len(tok),
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
            **_SMALL,
            **kw,
        ),
    ),
}


def _save_start(directory, family, tokenizer, seed=0):
    torch.manual_seed(seed)
    hf_config = FAMILIES[family][1](tokenizer)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def starts(tmp_path_factory):
    """family -> a tiny random HF checkpoint directory saved with its tokenizer."""
    texts = _texts()
    return {
        family: _save_start(tmp_path_factory.mktemp(family), family, make(texts))
        for family, (make, _) in FAMILIES.items()
    }


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _config(start, task, tfds_dir, **train):
    config = config_lib.sft_config(task)
    config.model_source.update(kind="hf", path=str(start))
    config.data.update(tfds_dir=str(tfds_dir), num_validation=16)
    config.train.update(
        dict(
            batch_size=8,
            max_length=MAX_LENGTH,
            loss_chunk_size=64,
            num_steps=8,
            log_every=1,
            eval_every=8,
        ),
        **train,
    )
    config.optim.update(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
    config.checkpoint.update(save_interval_steps=100)  # the last step and a stop save anyway
    config.logging.update(progress_bar=False, tensorboard=False)
    return config


def _check_masks(tokenizer, arrays, examples, max_length):
    """Every row: the prompt's tokens (BOS first when the tokenizer has one) with no
    loss, then the solution's tokens and the EOS, all with loss, then padding.
    Returns how many rows were cut at max_length."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    assert len(arrays["tokens"]) == len(examples)
    cut = 0
    for tokens, input_mask, loss_mask, ex in zip(
        arrays["tokens"], arrays["input_mask"], arrays["loss_mask"], examples, strict=True
    ):
        prompt = templates.format_prompt(ex["question"])
        solution = templates.format_completion(ex["answer"])
        n = int(input_mask.sum())
        assert input_mask[:n].all() and not loss_mask[n:].any()  # right padding, no loss
        (loss_at,) = np.nonzero(loss_mask)
        if not loss_at.size:  # the prompt alone fills max_length: nothing to learn from
            assert n == max_length
            cut += 1
            continue
        b = int(loss_at[0])
        assert loss_at.tolist() == list(range(b, n))  # one span, to the last real token
        if bos is not None:
            assert tokens[0] == bos and bos not in tokens[1:n].tolist()
        assert decode(tokens[:b]) == prompt  # no loss on exactly the prompt
        if n == max_length and tokens[n - 1] != eos:
            cut += 1  # the end of the solution (and its EOS) did not fit
            continue
        assert tokens[n - 1] == eos and eos not in tokens[b : n - 1].tolist()
        # The loss covers exactly the solution: prompt + loss span is prompt + solution.
        assert decode(tokens[: n - 1]) == prompt + solution
        assert decode(tokens[b : n - 1]).strip() == ex["answer"].strip()
    return cut


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("task", ["gsm8k", "svamp"])
def test_loss_masks_cover_exactly_the_solution_on_every_row(
    starts, tfds_dir, tmp_path, family, task
):
    config = _config(starts[family], task, tfds_dir)
    tokenizer = load_tokenizer(starts[family])  # as the hf model source reads it
    data = sft.prepare_data(config, str(tmp_path), tokenizer)
    train, evaluation = sft.examples(config)
    if task == "svamp":  # the fixed 700 / 300 split, less 16 validation questions
        assert (len(train), len(evaluation)) == (700 - 16, 16)
    else:
        assert (len(train), len(evaluation)) == (7473 - 16, 16)
    assert train[0]["question"].startswith(
        "Natalia sold clips" if task == "gsm8k" else "Each pack of dvds costs 76 dollars"
    ), train[0]["question"]
    cut = _check_masks(tokenizer, data.train, train, MAX_LENGTH)
    assert cut <= 0.02 * len(train), cut
    assert _check_masks(tokenizer, data.eval, evaluation, MAX_LENGTH) <= 1
    assert not (tmp_path / "tokenizer").exists()  # the model's tokenizer: none is trained


def _records(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _final(workdir):
    """(host params, progress, tokenizer) of a run's latest checkpoint, read through
    the `run` model source (as EI and evaluation read an SFT start)."""
    loaded = sources.load_run(str(workdir), mesh_lib.make_mesh((-1, 1, 1)), shd.DEFAULT_RULES)
    ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
    try:
        progress = ckpt.read_progress(ckpt.latest_step())
    finally:
        ckpt.close()
    return jax.device_get(loaded.params), progress, loaded.tokenizer


def _assert_learns(workdir, start, num_steps):
    """A few steps lower the loss (from ~ln 1024 = 6.9); the run is a model source with
    its start's tokenizer and the start's fingerprint."""
    records = _records(workdir)
    losses = [r["loss"] for r in records]
    assert len(losses) == num_steps and np.all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0] - 0.5, losses
    assert records[-1]["eval_loss"] < losses[0] - 0.5, records[-1]
    _, progress, tokenizer = _final(workdir)
    assert tokenizer.get_vocab() == load_tokenizer(start).get_vocab()
    mesh = mesh_lib.make_mesh((-1, 1, 1))
    start_params = sources.load_model("hf", str(start), mesh, shd.DEFAULT_RULES).params
    assert progress["initial"] == sources.checksum(start_params)


def _assert_resumes_bitwise(config, straight, workdir, stop_after):
    """Stopped after `stop_after` steps (as a preemption would), then the same config
    again: every record and every parameter as the uninterrupted run's."""
    config = copy.deepcopy(config)
    config.train.stop_after = stop_after
    sft.train(config, str(workdir))
    assert [r["step"] for r in _records(workdir)] == list(range(1, stop_after + 1))
    config.train.stop_after = 0
    sft.train(config, str(workdir))
    assert _records(workdir) == _records(straight)  # identical floats, eval included
    params_a, progress_a, _ = _final(straight)
    params_b, progress_b, _ = _final(workdir)
    assert progress_a == progress_b
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)


STEPS = 6


@pytest.fixture(scope="module")
def svamp_run(starts, tfds_dir, tmp_path_factory):
    """(config, workdir) of an uninterrupted SFT run: the Qwen2 start on SVAMP rows."""
    config = _config(starts["qwen2"], "svamp", tfds_dir, max_length=256, num_steps=STEPS)
    workdir = tmp_path_factory.mktemp("svamp_sft") / "run"
    sft.train(config, str(workdir))
    return config, workdir


def test_a_few_steps_lower_the_loss(svamp_run, starts):
    _assert_learns(svamp_run[1], starts["qwen2"], STEPS)


def test_a_stopped_and_resumed_run_ends_bitwise_equal(svamp_run, tmp_path):
    config, straight = svamp_run
    _assert_resumes_bitwise(config, straight, tmp_path / "resumed", stop_after=2)


def test_resuming_from_another_start_model_is_an_error(svamp_run, starts, tmp_path):
    config, straight = svamp_run
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    before = (workdir / "metrics.jsonl").read_bytes()
    # The same shapes and tokenizer, other weights.
    other = _save_start(tmp_path / "other", "qwen2", load_tokenizer(starts["qwen2"]), seed=1)
    config = copy.deepcopy(config)
    config.model_source.path = str(other)
    with pytest.raises(runs.ResumeConfigError, match="started from another model"):
        sft.train(config, str(workdir))
    assert (workdir / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow
def test_gsm8k_from_a_llama_start_learns_and_resumes_bitwise(starts, tfds_dir, tmp_path):
    config = _config(starts["llama"], "gsm8k", tfds_dir, max_length=256, num_steps=STEPS)
    sft.train(config, str(tmp_path / "straight"))
    _assert_learns(tmp_path / "straight", starts["llama"], STEPS)
    _assert_resumes_bitwise(config, tmp_path / "straight", tmp_path / "resumed", stop_after=4)


def test_real_data_needs_a_start_model():
    config = config_lib.base_config()
    config.data.task = "gsm8k"
    with pytest.raises(config_lib.InvalidConfigError, match="needs a start model"):
        config_lib.validate(config)
    config = config_lib.sft_config("gsm8k")
    config.model_source.kind = "hf"
    with pytest.raises(config_lib.InvalidConfigError, match="model_source.path is empty"):
        config_lib.validate(config)


@pytest.mark.slow
def test_gemma3_tokenizer_masks_on_gsm8k_and_the_config_length(tfds_dir, tmp_path):
    """The real Gemma 3 270M tokenizer (from the GGUF package, as the gguf source
    builds it) with configs/gemma3_270m_gsm8k_sft.py's rows and length."""
    from rl_reason.models.gemma3_270m import gemma3_270m_gguf

    path = gemma3_270m_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = gemma3_270m_gsm8k_sft.get_config()
    config.data.tfds_dir = str(tfds_dir)
    data = sft.prepare_data(config, str(tmp_path), tokenizer)
    train, evaluation = sft.examples(config)
    assert (len(train), len(evaluation)) == (7473 - 64, 64)
    cut = _check_masks(tokenizer, data.train, train, config.train.max_length)
    assert cut <= 0.02 * len(train), cut  # 384 tokens hold ~98.7% of the rows
    assert _check_masks(tokenizer, data.eval, evaluation, config.train.max_length) <= 1


@pytest.mark.slow
def test_killed_with_sigkill_and_rerun_ends_bitwise_equal(starts, tfds_dir, tmp_path):
    """`launch/train.py --config=configs/gemma3_270m_gsm8k_sft.py`, its model and sizes
    overridden to the tiny Llama start: killed (no handler, no save) before its
    first checkpoint and again between two, rerun, it ends as the uninterrupted run."""
    config = _config(starts["llama"], "gsm8k", tfds_dir, max_length=256, num_steps=STEPS + 2)
    config.checkpoint.save_interval_steps = 3
    overrides = subprocess_runs.config_overrides(config, gemma3_270m_gsm8k_sft.get_config())
    command = lambda workdir: subprocess_runs.train_command(
        workdir, "gemma3_270m_gsm8k_sft.py", overrides
    )
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess_runs.run(command(straight))
    # Before checkpoint 3; then once it is in place (an asynchronous save can finish
    # after later steps' records), before checkpoint 6.
    kill_points = {
        "2 records": lambda: len(subprocess_runs.records(killed)) >= 2,
        "checkpoint 3 and 4 records": lambda: (
            3 in subprocess_runs.checkpoint_steps(killed)
            and len(subprocess_runs.records(killed)) >= 4
        ),
    }
    for what, condition in kill_points.items():
        log = tmp_path / "killed.log"
        subprocess_runs.kill_when(command(killed), condition, what, log=log)
    assert 3 in subprocess_runs.checkpoint_steps(killed)
    subprocess_runs.run(command(killed))
    assert _records(killed) == _records(straight)
    params_a, progress_a, _ = _final(straight)
    params_b, progress_b, _ = _final(killed)
    assert progress_a == progress_b
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)

"""The small BPE tokenizer: special tokens, digits, exact round trips, save/load."""

import pytest

from rl_reason.data import synthetic, tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = [e["question"] + "\n" + e["answer"] for e in synthetic.generate("train", 500)]
    return tokenizer.train_tokenizer(texts, vocab_size=400)


def test_special_tokens(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("Ann has 3 apples.")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok("Ann", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


def test_digits_are_single_tokens(tok):
    tokens = tok.tokenize("12345*67=<<12345*67=827115>>827115")
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens and all(len(t) == 1 for t in digit_tokens)


@pytest.mark.parametrize(
    "text", ["Ann has 3*4=<<3*4=12>>12 apples.\n#### 12", "héllo 😀 \\boxed{1/2}\n\t  x", ""]
)
def test_decode_inverts_encode_and_offsets_cover_text(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    ends = [end for _, end in enc["offset_mapping"]]
    assert ends == sorted(ends) and (not text or ends[-1] == len(text))


def test_save_and_load_round_trip(tok, tmp_path):
    tokenizer.save_tokenizer(tok, tmp_path)
    loaded = tokenizer.load_tokenizer(tmp_path)
    text = synthetic.generate("test", 1)[0]["answer"]
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert len(loaded) == len(tok)

"""SentencePiece tokenizer: exact round trips, fixed special ids, byte counts, save/load."""

import random

import numpy as np
import pytest
from data_corpus import document

from workbench.engine.data.tokenizer import SPECIAL_TOKENS, Tokenizer, chat_format, train_tokenizer
from workbench.engine.errors import DataError

TRICKY = [
    "Hello\n\nworld\n",
    "\n",
    "\n\n\n",
    "  two  spaces\tand a tab\t\there",
    "    indented code:\n\tif x:\n\t\treturn  y  \n",
    " leading space",
    "trailing space ",
    "emoji 🎉👨‍👩‍👧 and CJK 漢字テスト, Ünïcödé, ﬁ ligature kept as is",
    "line\r\nwindows\rold mac",
    "bytes never seen: \x01\x7f ÿ \u2028 \U0001F600",
    "digits 1234567890 and 3.14159",
    "",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    texts = [document(rng) for _ in range(60)] + ["tabs\tand\n  spaces  here\n"] * 5
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(texts, out, vocab_size=400)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_special_tokens_have_fixed_ids_and_are_single_tokens(tok):
    assert tok.special_ids == {t: i + 1 for i, t in enumerate(SPECIAL_TOKENS)}
    assert tok.bos_id == tok.special_ids["<|bos|>"]
    assert tok.end_id == tok.special_ids["<|end|>"]
    for token, i in tok.special_ids.items():
        assert tok.encode(token) == [i]
    assert tok.encode("\n") == [len(SPECIAL_TOKENS) + 1]


def test_chat_format_encodes_to_special_tokens(tok):
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello\nfriend"}]
    text = tok.chat_format(messages)
    assert text == "<|user|>hi there<|end|><|assistant|>hello\nfriend<|end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.special_ids["<|user|>"] and ids[-1] == tok.end_id
    assert ids.count(tok.special_ids["<|assistant|>"]) == 1
    assert tok.decode(ids) == text
    with pytest.raises(ValueError):
        chat_format([{"role": "robot", "content": "x"}])


def test_decode_skips_bos(tok):
    ids = [tok.bos_id] + tok.encode("the king") + [tok.bos_id]
    assert tok.decode(ids) == "the king"


def test_encode_batch_matches_encode(tok):
    texts = ["the river", "a  b\n", "漢字"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_token_bytes_count_utf8_bytes_and_zero_for_specials(tok):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (tok.vocab_size,)
    assert tb[0] == 0  # <unk>
    assert all(tb[i] == 0 for i in tok.special_ids.values())
    for text in TRICKY:
        assert tb[tok.encode(text)].sum() == len(text.encode("utf-8"))


def test_save_load_and_hash(tok, tmp_path):
    tok.save(tmp_path, bytes_per_token=3.5)
    loaded = Tokenizer.load(tmp_path)
    same = Tokenizer.load(tmp_path / "tokenizer.model")
    assert loaded.sha256 == same.sha256 == tok.sha256
    assert loaded.encode("the storm and the sea") == tok.encode("the storm and the sea")
    assert (tmp_path / "token_bytes.npy").exists()
    assert loaded.meta()["model_type"] == "bpe"


def test_unigram_model_round_trips(tmp_path):
    rng = random.Random(1)
    tok = train_tokenizer([document(rng) for _ in range(40)], None, vocab_size=400, model_type="unigram")
    assert tok.model_type == "unigram"
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text


def test_bad_tokenizer_settings_and_files(tmp_path):
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["some text"], None, vocab_size=100)
    with pytest.raises(DataError, match="unknown tokenizer type"):
        train_tokenizer(["some text"], None, vocab_size=400, model_type="wordpiece")
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(DataError, match="corrupt"):
        Tokenizer.load(tmp_path / "bad.model")

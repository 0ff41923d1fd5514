"""SentencePiece tokenizer with chat special tokens, exact round trips and per-token byte counts.

SentencePiece is tuned for sentence-level MT by default; for a language model every
byte of the text must survive encode -> decode, so training turns off what rewrites
text: `normalization_rule_name="identity"` (we NFKC ourselves in workbench.engine.data.clean),
`remove_extra_whitespaces=False`, `add_dummy_prefix=False`. SentencePiece sees its input
as lines and never learns "\n", so "\n" is a user-defined symbol, and
`byte_fallback=True` makes any character outside the vocabulary a sequence of byte
tokens instead of <unk>. The special tokens are user-defined symbols too, at fixed ids
right after <unk> (see SPECIAL_TOKENS), so `encode(chat_format(messages))` yields them.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from workbench.engine.chat import render_text
from workbench.engine.errors import DataError

# Fixed ids: <unk> = 0, then these in order (1..6), then "\n" = 7, then the 256 byte tokens.
SPECIAL_TOKENS = ["<|bos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>"]
NEWLINE = "\n"
MIN_VOCAB = 1 + len(SPECIAL_TOKENS) + 1 + 256 + 16  # room for a few learned pieces
MAX_TRAIN_LINE_CHARS = 2000  # SentencePiece skips sentences over max_sentence_length (4192 bytes)


class Tokenizer:
    """A loaded SentencePiece model plus the ids of the special tokens."""

    def __init__(self, model_bytes: bytes):
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.model_bytes = model_bytes
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.vocab_size = self._sp.vocab_size()
        self.special_ids = {tok: self._sp.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        if any(self._sp.id_to_piece(i) != tok for tok, i in self.special_ids.items()):
            raise DataError(f"tokenizer.model lacks the workbench special and chat tokens ({' '.join(SPECIAL_TOKENS)});"
                            " it was not made by workbench prepare")
        self.bos_id = self.special_ids["<|bos|>"]
        self.end_id = self.special_ids["<|end|>"]
        self._skip_on_decode = {self.bos_id, self.special_ids["<|pad|>"]}

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a prepared dataset folder or a `.model` file."""
        path = Path(path)
        model_path = path / "tokenizer.model" if path.is_dir() else path
        try:
            data = model_path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"tokenizer not found: {model_path}") from None
        try:
            return cls(data)
        except RuntimeError:
            raise DataError(f"tokenizer model is corrupt: {model_path}") from None
        except DataError as e:
            raise DataError(f"{model_path}: {e}") from None

    @property
    def model_type(self) -> str:
        return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(_trainer_model_type(self.model_bytes), "unigram")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no <|bos|> added)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        """Text of `ids`; <|bos|> and <|pad|> are dropped, other special tokens appear as text."""
        return self._sp.decode([int(i) for i in ids if int(i) not in self._skip_on_decode])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte count each id stands for; 0 for <unk>, control and special tokens (as nanochat)."""
        sp = self._sp
        out = np.zeros(self.vocab_size, dtype=np.int32)
        special = set(self.special_ids.values())
        for i in range(self.vocab_size):
            if i in special or sp.is_unknown(i) or sp.is_control(i) or sp.is_unused(i):
                continue
            if sp.is_byte(i):
                out[i] = 1
            else:
                out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out

    def chat_format(self, messages: list[dict]) -> str:
        return chat_format(messages)

    def meta(self, bytes_per_token: float | None = None) -> dict:
        """The tokenizer.json content."""
        return {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "special_tokens": dict(self.special_ids),
            "sha256": self.sha256,
            "bytes_per_token": bytes_per_token,
        }

    def save(self, out_dir: str | Path, bytes_per_token: float | None = None) -> None:
        out_dir = Path(out_dir)
        (out_dir / "tokenizer.model").write_bytes(self.model_bytes)
        (out_dir / "tokenizer.json").write_text(json.dumps(self.meta(bytes_per_token), indent=2) + "\n")
        np.save(out_dir / "token_bytes.npy", self.token_bytes())


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _trainer_model_type(model: bytes) -> int:
    """TrainerSpec.model_type (field 3 of field 2) read straight from the protobuf bytes:
    sentencepiece's own `sentencepiece_model_pb2` needs the protobuf package, which we avoid."""

    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = _varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _varint(buf, i)
            elif wire == 2:
                n, i = _varint(buf, i)
                value, i = buf[i : i + n], i + n
            elif wire in (1, 5):
                value, i = None, i + (8 if wire == 1 else 4)
            else:
                return
            yield number, value

    for number, value in fields(model):
        if number == 2:
            for sub_number, sub_value in fields(value):
                if sub_number == 3:
                    return sub_value
    return 1  # the proto default: unigram


def chat_format(messages: list[dict]) -> str:
    """`[{"role", "content"}...]` -> "<|user|>hi<|end|><|assistant|>hello<|end|>" (ValueError if malformed);
    the chat template's text form, workbench.engine.chat.render_text."""
    return render_text(messages)


def _training_lines(texts: Iterable[str]) -> Iterable[str]:
    # Lines are what SentencePiece learns from; "\n" is a user-defined symbol, so no piece
    # ever crosses a line break and training on lines loses nothing.
    for text in texts:
        for line in text.split("\n"):
            for i in range(0, len(line), MAX_TRAIN_LINE_CHARS):
                yield line[i : i + MAX_TRAIN_LINE_CHARS]


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path | None,
    vocab_size: int,
    model_type: str = "bpe",
    num_threads: int = 2,
    max_sentences: int = 2_000_000,
) -> Tokenizer:
    """Train on `texts` (callers pass a bounded sample) and save tokenizer.model in `out_dir` if given."""
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"unknown tokenizer type {model_type!r} (choose bpe or unigram)")
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab size {vocab_size} is too small: at least {MIN_VOCAB} (special + 256 byte tokens)")
    if vocab_size > 2**31 - 1:
        raise DataError(f"vocab size {vocab_size} is too large")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_lines(texts)),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=SPECIAL_TOKENS + [NEWLINE],
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            character_coverage=0.9995,
            hard_vocab_limit=False,  # a small corpus gives a smaller vocab rather than an error
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=max(1, num_threads),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"tokenizer training failed: {str(e).strip().splitlines()[-1]}") from None
    tok = Tokenizer(model.getvalue())
    if out_dir is not None:
        (Path(out_dir) / "tokenizer.model").write_bytes(tok.model_bytes)
    return tok

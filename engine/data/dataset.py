"""A prepared dataset folder (the output of `workbench prepare`), opened and checked.

Layout: tokenizer.model, tokenizer.json, token_bytes.npy, train.bin, val.bin,
val_docs.npy ((n, 3) int64: start offset of the document's <|bos|> in val.bin, its
token count including that <|bos|>, its UTF-8 byte count not counting special tokens such as
the chat markers, i.e. the sum of token_bytes over its tokens, as bits per byte needs), val_docs.jsonl (source
and preview per val document), report.json, report.txt.

A chat dataset (prepared from conversations: workbench.engine.data.prepare) adds
  chat.json       {"version": 1, "template": "workbench-chat-v1", "seq_len": L, "row_tokens": L + 1,
                   "seq_len_from", "pad_id", "rows", "conversations", "trained_tokens" (per split)}
  train_mask.bin, val_mask.bin   uint8 shards (shards.py): the loss mask, one 0/1 per token of
                   train.bin / val.bin (1 on assistant content and its <|end|>: workbench.engine.chat)
and its train.bin / val.bin hold rows of exactly row_tokens tokens, back to back. A row starts with
<|bos|>, holds whole conversations (each starting with <|bos|>; one longer than a row was cut to
it) and ends in <|pad|> padding, mask 0. Its val_docs are the val conversations (padding lies
between them, so they do not tile val.bin).

For the trainer, a chat dataset (`ds.chat is not None`) is read by rows, never by windows across
them (a window would start mid-conversation):
    tokens, mask = ds.rows("train")            # (n_rows, row_tokens) read-only memmaps
    x, y, w = tokens[r, :-1], tokens[r, 1:], mask[r, 1:]   # w[t] = 1 where target y[t] is trained
    loss = sum(cross_entropy(x -> y) * w) / sum(w)
Val loss the same way on ds.rows("val"); bits per byte over trained targets: token_bytes[y] * w.
`check_seq_len(model.seq_len)` refuses a model whose context is shorter than the rows.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.engine.chat import TEMPLATE
from workbench.engine.data.shards import open_shard
from workbench.engine.data.tokenizer import Tokenizer
from workbench.engine.errors import DataError

REQUIRED_FILES = ("tokenizer.model", "tokenizer.json", "token_bytes.npy", "train.bin", "val.bin", "val_docs.npy")
CHAT_FILES = ("chat.json", "train_mask.bin", "val_mask.bin")
CHAT_FORMAT_VERSION = 1


@dataclass
class Dataset:
    path: Path
    tokenizer: Tokenizer
    meta: dict
    train: np.ndarray
    val: np.ndarray
    val_docs: np.ndarray
    token_bytes: np.ndarray
    chat: dict | None = None  # chat.json, for a chat dataset
    train_mask: np.ndarray | None = None  # uint8, one per token of train (chat datasets only)
    val_mask: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path) -> Dataset:
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"no prepared dataset at {path} (run `workbench prepare --out {path}` first)")
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            raise DataError(f"prepared dataset {path} is incomplete: missing {', '.join(missing)}")
        try:
            meta = json.loads((path / "tokenizer.json").read_text())
            token_bytes = np.load(path / "token_bytes.npy", allow_pickle=False)
            val_docs = np.load(path / "val_docs.npy", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"prepared dataset {path} is corrupt: {e}") from None
        tokenizer = Tokenizer.load(path)
        if meta.get("sha256") != tokenizer.sha256:
            raise DataError(f"prepared dataset {path} is inconsistent: tokenizer.json does not match tokenizer.model")
        if token_bytes.shape != (tokenizer.vocab_size,):
            raise DataError(f"prepared dataset {path} is corrupt: token_bytes.npy has shape {token_bytes.shape}")
        train = open_shard(path / "train.bin")
        val = open_shard(path / "val.bin")
        if len(train) == 0 or len(val) == 0:
            raise DataError(f"prepared dataset {path} has an empty {'train' if len(train) == 0 else 'val'} split")
        if val_docs.ndim != 2 or val_docs.shape[1] != 3 or len(val_docs) == 0:
            raise DataError(f"prepared dataset {path} is corrupt: val_docs.npy has shape {val_docs.shape}")
        chat = _read_chat_meta(path)
        end = int(val_docs[-1, 0] + val_docs[-1, 1])
        if end > len(val) or (chat is None and end != len(val)):
            raise DataError(f"prepared dataset {path} is corrupt: val_docs.npy does not cover val.bin")
        for name, arr in (("train", train), ("val", val)):
            # a flipped byte in a shard shows up as an id outside the vocabulary
            if int(arr.max()) >= tokenizer.vocab_size:
                raise DataError(f"prepared dataset {path} is corrupt: {name}.bin holds ids outside the vocabulary")
        masks = {}
        if chat is not None:
            for name, arr in (("train", train), ("val", val)):
                masks[name] = _check_chat_split(path, name, arr, chat, tokenizer.bos_id)
        return cls(path, tokenizer, meta, train, val, val_docs.astype(np.int64), token_bytes.astype(np.int32),
                   chat, masks.get("train"), masks.get("val"))

    @property
    def seq_len(self) -> int | None:
        """A chat dataset's seq_len (its rows hold seq_len + 1 tokens); None for plain text."""
        return self.chat["seq_len"] if self.chat else None

    def check_seq_len(self, model_seq_len: int) -> None:
        """A chat dataset's rows must fit the model's context: DataError in one line if they do not."""
        if self.chat and model_seq_len < self.chat["seq_len"]:
            raise DataError(f"{self.path} was packed for seq_len {self.chat['seq_len']} but model.seq_len is "
                            f"{model_seq_len}: prepare it again with --seq-len {model_seq_len}, or raise model.seq_len")

    def rows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, mask) of a chat dataset's split as (n_rows, row_tokens) arrays (views, not copies)."""
        if self.chat is None:
            raise DataError(f"{self.path} is plain-text data: it has no rows or loss mask")
        n = self.chat["row_tokens"]
        tokens, mask = (self.train, self.train_mask) if split == "train" else (self.val, self.val_mask)
        return tokens.reshape(-1, n), mask.reshape(-1, n)

    def conversations(self, split: str = "train"):
        """Yield (ids, mask) of each packed conversation of a chat split, in order (padding left out)."""
        tokens, masks = self.rows(split)
        bos, pad = self.tokenizer.bos_id, self.chat["pad_id"]
        for row, mask in zip(tokens, masks, strict=True):
            row = np.asarray(row)
            pads = np.flatnonzero(row == pad)
            end = int(pads[0]) if len(pads) else len(row)
            starts = [*np.flatnonzero(row[:end] == bos), end]
            for a, b in itertools.pairwise(starts):
                yield row[a:b], np.asarray(mask[a:b])

    def val_sources(self) -> list[dict]:
        """One {"source", "preview"} dict per val document, in val_docs order."""
        try:
            with open(self.path / "val_docs.jsonl", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except (FileNotFoundError, json.JSONDecodeError):
            return [{"source": "?", "preview": ""} for _ in range(len(self.val_docs))]


def _read_chat_meta(path: Path) -> dict | None:
    if not (path / "chat.json").is_file():
        return None
    missing = [name for name in CHAT_FILES if not (path / name).is_file()]
    if missing:
        raise DataError(f"prepared chat dataset {path} is incomplete: missing {', '.join(missing)}")
    try:
        chat = json.loads((path / "chat.json").read_text())
        version, template, row_tokens = chat["version"], chat["template"], int(chat["row_tokens"])
        int(chat["seq_len"]), int(chat["pad_id"]), dict(chat["rows"])
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise DataError(f"prepared dataset {path} is corrupt: chat.json: {e}") from None
    if version != CHAT_FORMAT_VERSION:
        raise DataError(f"{path} is chat data of format {version}; this workbench reads {CHAT_FORMAT_VERSION}")
    if template != TEMPLATE:
        raise DataError(f"{path} was rendered with chat template {template!r}; this workbench uses {TEMPLATE!r}")
    if row_tokens != chat["seq_len"] + 1:
        raise DataError(f"prepared dataset {path} is corrupt: chat.json row_tokens is not seq_len + 1")
    return chat


def _check_chat_split(path: Path, name: str, tokens: np.ndarray, chat: dict, bos_id: int) -> np.ndarray:
    """The split's mask, once its shape and rows agree with chat.json."""
    mask = open_shard(path / f"{name}_mask.bin")
    n = chat["row_tokens"]
    if mask.dtype != np.uint8 or len(mask) != len(tokens):
        raise DataError(f"prepared dataset {path} is corrupt: {name}_mask.bin does not match {name}.bin")
    if len(tokens) != chat["rows"].get(name, -1) * n:
        raise DataError(f"prepared dataset {path} is corrupt: {name}.bin is not {chat['rows'].get(name)} rows of {n}")
    if (tokens[::n] != bos_id).any():
        raise DataError(f"prepared dataset {path} is corrupt: a row of {name}.bin does not start with <|bos|>")
    if int(mask.max()) > 1:
        raise DataError(f"prepared dataset {path} is corrupt: {name}_mask.bin holds values other than 0 and 1")
    return mask

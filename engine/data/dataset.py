"""A prepared dataset folder (the output of `workbench prepare`), opened and checked.

Layout: tokenizer.model, tokenizer.json, token_bytes.npy, train.bin, val.bin,
val_docs.npy ((n, 3) int64: start offset of the document's <|bos|> in val.bin, its
token count including that <|bos|>, its UTF-8 byte count not counting special tokens such as
the chat markers, i.e. the sum of token_bytes over its tokens, as bits per byte needs), val_docs.jsonl (source
and preview per val document), report.json, report.txt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.engine.errors import DataError
from workbench.engine.data.shards import open_shard
from workbench.engine.data.tokenizer import Tokenizer

REQUIRED_FILES = ("tokenizer.model", "tokenizer.json", "token_bytes.npy", "train.bin", "val.bin", "val_docs.npy")


@dataclass
class Dataset:
    path: Path
    tokenizer: Tokenizer
    meta: dict
    train: np.ndarray
    val: np.ndarray
    val_docs: np.ndarray
    token_bytes: np.ndarray

    @classmethod
    def open(cls, path: str | Path) -> "Dataset":
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
        if int(val_docs[-1, 0] + val_docs[-1, 1]) != len(val):
            raise DataError(f"prepared dataset {path} is corrupt: val_docs.npy does not cover val.bin")
        for name, arr in (("train", train), ("val", val)):
            # a flipped byte in a shard shows up as an id outside the vocabulary
            if int(arr.max()) >= tokenizer.vocab_size:
                raise DataError(f"prepared dataset {path} is corrupt: {name}.bin holds ids outside the vocabulary")
        return cls(path, tokenizer, meta, train, val, val_docs.astype(np.int64), token_bytes.astype(np.int32))

    def val_sources(self) -> list[dict]:
        """One {"source", "preview"} dict per val document, in val_docs order."""
        try:
            with open(self.path / "val_docs.jsonl", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except (FileNotFoundError, json.JSONDecodeError):
            return [{"source": "?", "preview": ""} for _ in range(len(self.val_docs))]

"""Token shards: a 64-byte header then a flat array of token ids, read back as a numpy memmap.

Header (little-endian): magic b"WBTOKENS" (8 bytes), version u32, itemsize u32
(2 = uint16, 4 = uint32; 1 = uint8, for a chat dataset's loss mask beside its tokens),
count u64 (number of items), zero padding to 64 bytes.
The writer streams tokens out and writes the final count into the header on close,
so a shard whose header count disagrees with its size is detected as truncated.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from workbench.engine.errors import DataError

MAGIC = b"WBTOKENS"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


_DTYPES = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}


class ShardWriter:
    """Append token arrays to a shard file; `close()` fixes the count and fsyncs.

    `dtype` overrides the one the vocabulary implies (np.uint8 for a loss mask)."""

    def __init__(self, path: str | Path, vocab_size: int, dtype=None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype) if dtype is not None else dtype_for_vocab(vocab_size)
        self.count = 0
        self._file = open(self.path, "wb")
        self._file.write(self._header())

    def _header(self) -> bytes:
        head = _HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count)
        return head + b"\0" * (HEADER_BYTES - len(head))

    def write(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.size == 0:
            return
        if arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max:
            raise ValueError(f"token id out of range for {self.dtype}")
        self._file.write(arr.astype(self.dtype, copy=False).tobytes())
        self.count += int(arr.size)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(self._header())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"token shard not found: {path}") from None
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise DataError(f"not a workbench token shard (bad header): {path}")
    _, version, itemsize, count = _HEADER.unpack(head[: _HEADER.size])
    if version != VERSION:
        raise DataError(f"token shard {path} has version {version}, this workbench reads {VERSION}")
    if itemsize not in _DTYPES:
        raise DataError(f"token shard {path} has an invalid item size {itemsize}")
    dtype = _DTYPES[itemsize]
    expected = HEADER_BYTES + count * itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(f"token shard {path} is truncated or corrupt: {actual} bytes, header says {expected}")
    return dtype, count


def open_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens (read-only); validates the header and the size."""
    dtype, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))

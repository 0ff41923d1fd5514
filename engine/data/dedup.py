"""Exact and near-duplicate removal, streaming: only digests and a compact LSH index stay in memory.

Exact: a 16-byte BLAKE2b digest of the cleaned text; a document whose digest was seen
is dropped. The digest also decides the train/val split (see prepare.py).

Near: MinHash over word 5-gram shingles, 64 permutations, banded LSH. Words are hashed
with CRC32 (C speed, the same in every process, so results are reproducible) and the
signature is computed with numpy: affine hashing of 32-bit values (a*x + b mod 2^32 over
a MurmurHash-mixed shingle hash), datasketch's "affine32" scheme. Every LSH candidate is
verified against its stored signature, so a document is dropped only when its estimated
Jaccard similarity to a kept one reaches the threshold.

Why not datasketch's MinHashLSH: it costs about 3.4 KB of memory per kept document (a set
per bucket, plus a key table), its import pulls in scipy (50 MB, about a second), and
`MinHash.update_batch` calls a Python hash function per shingle. The index here is one
dict from (band, band hash) to the first document in that bucket, plus the signatures:
about 1 KB per kept document, so a corpus far larger than RAM streams through.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

NUM_PERM = 64
SEED = 1


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """uint64 hashes of the word n-grams of `text` (one per n-gram, repeats kept)."""
    words = text.encode("utf-8").split()
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    w = np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=len(words))
    h = np.zeros(len(words) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around multiplication is the point
        for i in range(n):
            h = h * np.uint64(0x100000001B3) + w[i : len(w) - n + 1 + i]
    return h


def _fmix32(x: np.ndarray) -> np.ndarray:
    # MurmurHash3's finalizer: spreads the bits of the shingle hash before the affine step.
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


class MinHasher:
    """MinHash signatures (uint32 x num_perm) of unique shingle hashes; the same in every process."""

    def __init__(self, num_perm: int = NUM_PERM):
        rng = np.random.RandomState(SEED)
        self.a = (rng.randint(1, 2**32, size=num_perm, dtype=np.uint64) | 1).astype(np.uint32)[:, None]
        self.b = rng.randint(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)[:, None]
        self.num_perm = num_perm

    def __call__(self, unique_shingles: np.ndarray) -> np.ndarray:
        x = (unique_shingles ^ (unique_shingles >> np.uint64(32))).astype(np.uint32)
        with np.errstate(over="ignore"):
            return (self.a * _fmix32(x)[None, :] + self.b).min(axis=1)


def band_params(threshold: float, num_perm: int, fp_weight: float = 0.1, fn_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows) minimising the weighted areas of false positives and negatives, as datasketch
    does; weighted towards recall, since a false candidate only costs a signature check."""
    s = (np.arange(2000) + 0.5) / 2000  # midpoints: the integrals below are plain sums
    below = s < threshold
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1 - (1 - s**r) ** b  # probability that two documents of similarity s share a bucket
            fp = p[below].sum() / len(s)
            fn = (1 - p[~below]).sum() / len(s)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class NearDedup:
    """Banded LSH over kept documents' signatures; `is_duplicate` checks and inserts."""

    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM):
        self.hasher = MinHasher(num_perm)
        self.threshold = threshold
        self.bands, self.rows = band_params(threshold, num_perm)
        self._buckets: dict[int, int] = {}  # band index + hash of the band's values -> first doc there
        self._signatures = np.zeros((1024, num_perm), dtype=np.uint32)
        self._count = 0

    def is_duplicate(self, unique_shingles: np.ndarray) -> bool:
        """True when a similar document was seen; otherwise remember this one. Takes np.unique(shingles)."""
        if len(unique_shingles) == 0:
            return False  # too few words to compare; exact dedup still applies
        return self.is_duplicate_signature(self.hasher(unique_shingles))

    def _band_keys(self, values: np.ndarray) -> list[int]:
        bands = values[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            h = np.zeros(self.bands, dtype=np.uint64)
            for i in range(self.rows):
                h = h * np.uint64(0x9E3779B97F4A7C15) + bands[:, i]
            h = h * np.uint64(self.bands) + np.arange(self.bands, dtype=np.uint64)  # one key space per band
        return h.tolist()

    def is_duplicate_signature(self, values: np.ndarray) -> bool:
        keys = self._band_keys(values)
        candidates = {self._buckets[k] for k in keys if k in self._buckets}
        if candidates:
            similarity = (self._signatures[list(candidates)] == values).mean(axis=1)
            if similarity.max() >= self.threshold:
                return True
        if self._count == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.zeros_like(self._signatures)])
        self._signatures[self._count] = values
        doc = self._count
        for k in keys:
            self._buckets.setdefault(k, doc)
        self._count += 1
        return False

"""Pass 1 of prepare: documents stream through cleaning, filters and dedup; kept ones go to a file.

The per-document work (clean, digest, shingles, quality filters, MinHash signature) needs no
shared state, so with several cores it runs in worker processes; what does need it (the digest
set, the LSH index, the kept file) stays in this process and sees the documents in input
order, so the result is identical for any number of workers. At most two batches per worker
are in flight (backpressure), so memory stays bounded whatever the corpus size. Workers are
spawned, not forked: prepare() may be called from a process with threads (the TUI, torch).
"""

from __future__ import annotations

import json
import multiprocessing
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from workbench.engine.data.clean import clean_text
from workbench.engine.data.dedup import MinHasher, NearDedup, digest, shingle_hashes
from workbench.engine.data.filters import REASONS, QualityFilter
from workbench.engine.data.settings import PrepareSettings

DROP_REASONS = ("exact_duplicate",) + REASONS + ("near_duplicate",)
BATCH_CHARS = 1_000_000
PARALLEL_MIN_BYTES = 8_000_000  # below this, starting workers costs more than it saves


class Analyser:
    """The pure per-document part: (is_val_source, source, raw) -> a result tuple, or None if empty."""

    def __init__(self, s: PrepareSettings):
        self.quality = QualityFilter(s.min_chars, s.max_line_chars, s.min_alpha_frac, s.max_dup_line_frac,
                                     s.max_dup_ngram_frac, s.blocklist)
        self.hasher = MinHasher() if s.near_dedup else None

    def __call__(self, batch: list[tuple[bool, str, str]]) -> list[tuple | None]:
        out = []
        for is_val_source, source, raw in batch:
            text = clean_text(raw)
            if not text:
                out.append(None)
                continue
            shingles = shingle_hashes(text)
            unique = np.unique(shingles)
            reason = self.quality.reason(text, shingles, unique)
            signature = self.hasher(unique) if reason is None and self.hasher and len(unique) else None
            nbytes = len(text) if text.isascii() else len(text.encode("utf-8"))
            out.append((is_val_source, source, text, nbytes, digest(text), reason, signature))
        return out


_worker_analyser: Analyser | None = None


def _init_worker(settings: dict) -> None:
    global _worker_analyser
    _worker_analyser = Analyser(PrepareSettings(**settings))


def _analyse_in_worker(batch):
    return _worker_analyser(batch)


def _batches(docs: Iterable[tuple[bool, str, str]], chars_seen: list[int]) -> Iterator[list]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[2])
        if size >= BATCH_CHARS:
            chars_seen[0] += size
            yield batch
            batch, size = [], 0
    if batch:
        chars_seen[0] += size
        yield batch


def _analysed(docs, s: PrepareSettings, workers: int, chars_seen: list[int]) -> Iterator[tuple | None]:
    batches = _batches(docs, chars_seen)
    if workers <= 1:
        analyse = Analyser(s)
        for batch in batches:
            yield from analyse(batch)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(asdict(s),)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_analyse_in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def read_pass(docs: Iterable[tuple[bool, str, str]], kept_path: Path, s: PrepareSettings, workers: int,
              progress: Callable[..., None], total_bytes: int) -> tuple[dict, array, array, bytearray]:
    """Write kept documents to `kept_path` as JSON lines {"s": source, "t": text, "n": utf-8 bytes}.

    Returns (counts, keys, sizes, from_val_source): counts of input and of drops per reason, and
    per kept document the first 8 bytes of its digest (split and sampling decisions), its UTF-8
    bytes and whether it came from a val source: 17 bytes a document, the only per-document state."""
    near = NearDedup(s.near_dup_threshold) if s.near_dedup else None
    seen: set[bytes] = set()
    dropped = {r: {"documents": 0, "bytes": 0} for r in DROP_REASONS}
    inp = {"documents": 0, "bytes": 0}
    keys = array("Q")
    sizes = array("Q")
    from_val_source = bytearray()
    chars_seen = [0]
    with open(kept_path, "w", encoding="utf-8") as kept:
        for result in _analysed(docs, s, workers, chars_seen):
            if result is None:
                continue
            is_val_source, source, text, nbytes, d, reason, signature = result
            inp["documents"] += 1
            inp["bytes"] += nbytes
            if d in seen:
                reason = "exact_duplicate"
            else:
                seen.add(d)
                if reason is None and signature is not None and near.is_duplicate_signature(signature):
                    reason = "near_duplicate"
            if reason is not None:
                dropped[reason]["documents"] += 1
                dropped[reason]["bytes"] += nbytes
            else:
                kept.write(json.dumps({"s": source, "t": text, "n": nbytes}, ensure_ascii=False) + "\n")
                keys.append(int.from_bytes(d[:8], "little"))
                sizes.append(nbytes)
                from_val_source.append(is_val_source)
            progress(stage="read", docs=inp["documents"], bytes=inp["bytes"],
                     fraction=min(1.0, chars_seen[0] / total_bytes) if total_bytes else None)
    progress(force=True, stage="read", docs=inp["documents"], bytes=inp["bytes"], fraction=1.0)
    return {"input": inp, "dropped": dropped}, keys, sizes, from_val_source

"""The data pipeline: sources -> clean -> filter -> dedup -> tokenizer -> train/val shards + report.

Three streaming passes keep memory bounded whatever the corpus size:
1. read (stream.py): every document is cleaned, exact-deduplicated (digest set), filtered
   and near-deduplicated (MinHash LSH index), on `workers` processes; kept documents go to
   a temporary JSONL file beside the output.
2. tokenizer: SentencePiece is trained on a bounded, deterministic sample of the kept
   train documents (`tokenizer_sample_mb`), or an existing one is reused (`tokenizer_from`).
3. encode: the kept documents are read back in batches, encoded on `threads` threads and
   appended to train.bin / val.bin, each document starting with <|bos|>.
What grows with the corpus is only per-document bookkeeping: about 100 bytes per input
document (its digest) and about 1 KB per kept one (its MinHash signature and LSH buckets),
around 1/8 of an 8 KB document; the text itself is never held in memory beyond a batch.
The val split is held out by document: a document is val when its digest falls below
`val_fraction` of the hash range (the same text always lands on the same side); at least
one document goes to each side. With `val_sources`, those sources are the val split instead.
Everything is written in a temporary folder beside `out`, renamed into place at the end:
a failed or killed prepare never leaves a half dataset, nor touches an existing one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from workbench.engine.data.builtin import builtin_documents
from workbench.engine.data.report import add_token_estimates, render_text, write_report
from workbench.engine.data.settings import PrepareSettings
from workbench.engine.data.sources import check_sources, read_documents
from workbench.engine.data.stream import PARALLEL_MIN_BYTES, read_pass
from workbench.engine.errors import DataError
from workbench.engine.rundir import fsync_dir
from workbench.engine.data.shards import ShardWriter
from workbench.engine.data.tokenizer import Tokenizer, train_tokenizer

PREVIEW_CHARS = 200
ENCODE_BATCH_CHARS = 1_000_000  # ~25 MB of Python ints per batch: bounded memory, enough docs for threads


def _input_size(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        else:
            for root, _, files in os.walk(p):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


class _Progress:
    """Calls the user's callback at most every 0.2 s (and always at stage ends)."""

    def __init__(self, callback: Callable[[dict], None] | None):
        self.callback = callback
        self.last = 0.0
        self.stage = None

    def __call__(self, force: bool = False, **event) -> None:
        now = time.monotonic()
        if self.callback is not None and (force or event["stage"] != self.stage or now - self.last >= 0.2):
            self.last, self.stage = now, event["stage"]
            self.callback(event)


def _split(keys: array, from_val_source: bytearray, s: PrepareSettings) -> np.ndarray:
    """Boolean is-val per kept document; at least one on each side."""
    n = len(keys)
    k = np.frombuffer(keys, dtype=np.uint64) if n else np.zeros(0, np.uint64)
    if s.val_sources:
        is_val = np.frombuffer(bytes(from_val_source), dtype=np.uint8).astype(bool)
        if not is_val.any():
            raise DataError("every document of the --val-source paths was dropped by the filters")
        if is_val.all():
            raise DataError("no training documents left: everything kept came from --val-source")
        return is_val
    is_val = k < np.uint64(int(s.val_fraction * 2**64))
    if not is_val.any():
        is_val[int(np.argmin(k))] = True
    if is_val.all():
        is_val[int(np.argmax(k))] = False
    return is_val


def _kept_docs(kept_path: Path) -> Iterator[dict]:
    with open(kept_path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _tokenizer_sample(kept_path: Path, keys: array, is_val: np.ndarray, train_bytes: int,
                      budget_bytes: int, stats: Counter) -> Iterator[str]:
    # A deterministic sample: a document is in when the low 32 bits of its digest fall below p.
    p = min(1.0, budget_bytes / max(1, train_bytes))
    limit = int(p * 2**32)
    for i, doc in enumerate(_kept_docs(kept_path)):
        if not is_val[i] and (keys[i] & 0xFFFFFFFF) < limit:
            stats["tokenizer_sample_bytes"] += doc["n"]
            yield doc["t"]


def _encode_pass(kept_path: Path, tok, is_val: np.ndarray, out: Path, threads: int, progress: _Progress) -> dict:
    """Pass 3: encode kept docs into train.bin / val.bin; writes val_docs.npy and val_docs.jsonl."""
    splits = {name: {"documents": 0, "bytes": 0, "tokens": 0} for name in ("train", "val")}
    val_rows: list[tuple[int, int, int]] = []
    n_docs = len(is_val)
    bos = tok.bos_id
    token_bytes = tok.token_bytes()
    with ShardWriter(out / "train.bin", tok.vocab_size) as train_w, \
            ShardWriter(out / "val.bin", tok.vocab_size) as val_w, \
            open(out / "val_docs.jsonl", "w", encoding="utf-8") as val_meta:
        writers = {"train": train_w, "val": val_w}
        index = 0
        docs = _kept_docs(kept_path)
        while True:
            batch, chars = [], 0
            for doc in docs:
                batch.append(doc)
                chars += len(doc["t"])
                if chars >= ENCODE_BATCH_CHARS:
                    break
            if not batch:
                break
            encoded = tok.encode_batch([d["t"] for d in batch], num_threads=threads)
            chunks = {"train": [], "val": []}
            for doc, ids in zip(batch, encoded):
                split = "val" if is_val[index] else "train"
                index += 1
                row = splits[split]
                if split == "val":
                    # bytes as bits per byte counts them: special tokens (chat markers) carry none
                    nbytes = int(token_bytes[np.asarray(ids, dtype=np.int64)].sum()) if ids else 0
                    val_rows.append((row["tokens"], len(ids) + 1, nbytes))  # tokens so far = this doc's offset
                    val_meta.write(json.dumps({"source": doc["s"], "preview": doc["t"][:PREVIEW_CHARS]},
                                              ensure_ascii=False) + "\n")
                row["documents"] += 1
                row["bytes"] += doc["n"]
                row["tokens"] += len(ids) + 1
                chunks[split].append([bos])
                chunks[split].append(ids)
            for split, parts in chunks.items():
                if parts:
                    writers[split].write(np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64))
            progress(stage="encode", docs=index, bytes=splits["train"]["bytes"] + splits["val"]["bytes"],
                     fraction=index / n_docs)
    np.save(out / "val_docs.npy", np.array(val_rows, dtype=np.int64).reshape(-1, 3))
    return splits


def _clear_stale_partials(out: Path) -> None:
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # still running: leave it
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare(sources: Iterable[str | Path] | None, out: str | Path, settings=None,
            progress: Callable[[dict], None] | None = None) -> dict:
    """Prepare a dataset folder at `out` from `sources` (None or empty: the built-in corpus); returns the report."""
    s = PrepareSettings.from_any(settings)
    s.validate()
    paths = check_sources(sources or [])
    val_paths = check_sources(s.val_sources)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not s.force:
        raise DataError(f"--out {out} exists and is not empty (use --force to replace it)")
    # e.g. to fine-tune a checkpoint on new data, where the ids must mean what they meant
    reused = Tokenizer.load(s.tokenizer_from) if s.tokenizer_from else None
    threads = s.threads or os.cpu_count() or 1
    started = time.monotonic()
    report_progress = _Progress(progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stats: Counter = Counter()
        if paths:
            docs = ((False, src, text) for src, text in read_documents(paths, stats, s.doc_chars))
        else:
            docs = ((False, src, text) for src, text in builtin_documents(s.doc_chars))
        if val_paths:
            docs = itertools.chain(docs, ((True, src, t) for src, t in read_documents(val_paths, stats, s.doc_chars)))
        total_bytes = _input_size(paths + val_paths)
        kept_path = tmp / "kept.jsonl"
        workers = s.workers or ((os.cpu_count() or 1) if total_bytes >= PARALLEL_MIN_BYTES else 1)
        counts, keys, sizes, from_val_source = read_pass(docs, kept_path, s, workers, report_progress, total_bytes)
        stage_seconds = {"read": time.monotonic() - started}
        _check_not_empty(counts, stats, len(keys))
        is_val = _split(keys, from_val_source, s)

        report_progress(force=True, stage="tokenizer", docs=len(keys), bytes=0, fraction=0.0)
        if reused is not None:
            tok = reused
        else:
            train_bytes = int(np.frombuffer(sizes, dtype=np.uint64)[~is_val].sum())
            budget = int(s.tokenizer_sample_mb * 1e6)
            sample = _tokenizer_sample(kept_path, keys, is_val, train_bytes, budget, stats)
            tok = train_tokenizer(sample, None, s.vocab_size, s.tokenizer, num_threads=threads)
        stage_seconds["tokenizer"] = time.monotonic() - started - sum(stage_seconds.values())
        report_progress(force=True, stage="tokenizer", docs=len(keys), bytes=stats["tokenizer_sample_bytes"],
                        fraction=1.0)

        splits = _encode_pass(kept_path, tok, is_val, tmp, threads, report_progress)
        stage_seconds["encode"] = time.monotonic() - started - sum(stage_seconds.values())
        kept_path.unlink()
        kept = {k: splits["train"][k] + splits["val"][k] for k in ("documents", "bytes", "tokens")}
        bytes_per_token = kept["bytes"] / max(1, kept["tokens"] - kept["documents"])  # <|bos|> carries no bytes
        tok.save(tmp, bytes_per_token=round(bytes_per_token, 4))

        seconds = time.monotonic() - started
        report = {
            "sources": [str(p) for p in paths],
            "val_sources": [str(p) for p in val_paths],
            "settings": dataclasses.asdict(s),
            "input": {**dict(sorted(stats.items())), **counts["input"]},
            "kept": kept,
            "dropped": counts["dropped"],
            "splits": splits,
            "tokenizer": {**tok.meta(round(bytes_per_token, 4)), "sample_bytes": stats["tokenizer_sample_bytes"]},
            "seconds": round(seconds, 2),
            "stage_seconds": {k: round(v, 2) for k, v in stage_seconds.items()},
            "workers": workers,
            "threads": threads,
            "mb_per_s": round(counts["input"]["bytes"] / 1e6 / max(seconds, 1e-9), 3),
        }
        report["input"].pop("tokenizer_sample_bytes", None)
        add_token_estimates(report)
        write_report(tmp, report)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report_progress(force=True, stage="done", docs=kept["documents"], bytes=kept["bytes"], fraction=1.0)
    return report


def _check_not_empty(counts: dict, stats: Counter, n_kept: int) -> None:
    if counts["input"]["documents"] == 0:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(stats.items())
                           if k.startswith(("files_skipped", "files_ignored", "jsonl_malformed")))
        raise DataError("no text found in the sources" + (f" ({detail})" if detail else ""))
    if n_kept < 2:
        why = ", ".join(f"{r}={row['documents']}" for r, row in counts["dropped"].items() if row["documents"])
        raise DataError(f"{n_kept} of {counts['input']['documents']} documents left after filtering and dedup"
                        + (f" ({why})" if why else "") + "; at least 2 are needed (train and val): "
                        "add text or loosen the filters")

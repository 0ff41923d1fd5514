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

Chat sources (JSONL `messages` or `prompt`/`completion`, or a run's conversations.jsonl read with its
feedback, counted in the report's chat.conversation_log: sources.py) and
`builtin_chat` take the same three passes shaped for conversations, `_prepare_chat`: checked
by the chat template's rules instead of the text filters, rendered with their loss mask and
packed best-fit into rows of seq_len + 1 tokens; the layout is in dataset.py.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import os
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from workbench.engine import config as config_mod
from workbench.engine.chat import REASONS, ChatError, ChatTemplate, check_messages, render_text
from workbench.engine.data.builtin import builtin_documents
from workbench.engine.data.builtin_chat import SOURCE as BUILTIN_CHAT_SOURCE
from workbench.engine.data.builtin_chat import builtin_conversations
from workbench.engine.data.clean import clean_text
from workbench.engine.data.dataset import CHAT_FORMAT_VERSION
from workbench.engine.data.dedup import digest
from workbench.engine.data.report import add_token_estimates, write_report
from workbench.engine.data.settings import DEFAULT_CHAT_SEQ_LEN, PrepareSettings
from workbench.engine.data.shards import ShardWriter
from workbench.engine.data.sources import (
    CHAT_RECORD_REASONS,
    LOG_PREFIX,
    check_sources,
    read_chat_records,
    read_documents,
    source_kind,
)
from workbench.engine.data.stream import PARALLEL_MIN_BYTES, read_pass
from workbench.engine.data.tokenizer import Tokenizer, train_tokenizer
from workbench.engine.errors import DataError
from workbench.engine.rundir import fsync_dir

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
                      budget_bytes: int, stats: Counter, text=lambda doc: doc["t"]) -> Iterator[str]:
    # A deterministic sample: a document is in when the low 32 bits of its digest fall below p.
    p = min(1.0, budget_bytes / max(1, train_bytes))
    limit = int(p * 2**32)
    for i, doc in enumerate(_kept_docs(kept_path)):
        if not is_val[i] and (keys[i] & 0xFFFFFFFF) < limit:
            stats["tokenizer_sample_bytes"] += doc["n"]
            yield text(doc)


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
            for doc, ids in zip(batch, encoded, strict=True):
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
    """Prepare a dataset folder at `out` from `sources` (None or empty: the built-in corpus); returns the report.

    Chat sources (sources.source_kind) or `builtin_chat` make a chat dataset (see _prepare_chat)."""
    s = PrepareSettings.from_any(settings)
    s.validate()
    paths = check_sources(sources or [])
    val_paths = check_sources(s.val_sources)
    kind = source_kind(paths + val_paths) if (paths or val_paths) and not s.flatten_chat else "text"
    if s.builtin_chat and (paths or val_paths) and kind != "chat":
        raise DataError("--builtin-chat makes chat data but the sources are plain text: prepare them separately")
    chat = s.builtin_chat or kind == "chat"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not s.force:
        raise DataError(f"--out {out} exists and is not empty (use --force to replace it)")
    # e.g. to fine-tune a checkpoint on new data, where the ids must mean what they meant
    reused = Tokenizer.load(s.tokenizer_from) if s.tokenizer_from else None
    if chat and reused is not None:
        ChatTemplate(reused)  # a tokenizer without the chat tokens fails here, before any work
    threads = s.threads or os.cpu_count() or 1
    report_progress = _Progress(progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build = _prepare_chat if chat else _prepare_text
        report = build(paths, val_paths, s, tmp, reused, threads, report_progress)
        add_token_estimates(report)
        write_report(tmp, report)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kept = report["kept"]
    report_progress(force=True, stage="done", docs=kept["documents"], bytes=kept["bytes"], fraction=1.0)
    return report


def _choose_tokenizer(reused, kept_path: Path, keys: array, sizes: array, is_val: np.ndarray, s: PrepareSettings,
                      stats: Counter, threads: int, progress: _Progress, text=lambda doc: doc["t"]):
    """The reused tokenizer, or one trained on a sample of the kept train documents (`text` of each)."""
    progress(force=True, stage="tokenizer", docs=len(keys), bytes=0, fraction=0.0)
    if reused is not None:
        tok = reused
    else:
        train_bytes = int(np.frombuffer(sizes, dtype=np.uint64)[~is_val].sum())
        budget = int(s.tokenizer_sample_mb * 1e6)
        sample = _tokenizer_sample(kept_path, keys, is_val, train_bytes, budget, stats, text)
        tok = train_tokenizer(sample, None, s.vocab_size, s.tokenizer, num_threads=threads)
    progress(force=True, stage="tokenizer", docs=len(keys), bytes=stats["tokenizer_sample_bytes"], fraction=1.0)
    return tok


def _report(paths, val_paths, s, stats, counts, splits, kept, tok, bytes_per_token, stage_seconds,
            started, **extra) -> dict:
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
        **extra,
        "mb_per_s": round(counts["input"]["bytes"] / 1e6 / max(seconds, 1e-9), 3),
    }
    report["input"].pop("tokenizer_sample_bytes", None)
    return report


def _prepare_text(paths, val_paths, s: PrepareSettings, tmp: Path, reused, threads: int,
                  report_progress: _Progress) -> dict:
    """The plain-text pipeline (the module docstring's three passes) into `tmp`; returns the report."""
    started = time.monotonic()
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

    tok = _choose_tokenizer(reused, kept_path, keys, sizes, is_val, s, stats, threads, report_progress)
    stage_seconds["tokenizer"] = time.monotonic() - started - sum(stage_seconds.values())

    splits = _encode_pass(kept_path, tok, is_val, tmp, threads, report_progress)
    stage_seconds["encode"] = time.monotonic() - started - sum(stage_seconds.values())
    kept_path.unlink()
    kept = {k: splits["train"][k] + splits["val"][k] for k in ("documents", "bytes", "tokens")}
    bytes_per_token = kept["bytes"] / max(1, kept["tokens"] - kept["documents"])  # <|bos|> carries no bytes
    tok.save(tmp, bytes_per_token=round(bytes_per_token, 4))
    return _report(paths, val_paths, s, stats, counts, splits, kept, tok, bytes_per_token, stage_seconds, started,
                   workers=workers, threads=threads)


# --- chat data -------------------------------------------------------------------------------------------

# Why a chat record is skipped (each counted in the report, with its meaning).
CHAT_DROP_REASONS = {
    **CHAT_RECORD_REASONS,
    **{r: why for r, why in REASONS.items() if r not in ("last_not_user", "too_long")},  # those are for generation
    "exact_duplicate": "the same messages as a conversation kept before",
    "truncated_to_nothing": "cut to a row of seq_len + 1 tokens, no assistant token was left",
}
CHAT_SPLIT_COUNTS = ("rows", "trained_tokens", "untrained_tokens", "padding_tokens", "truncated", "truncated_tokens",
                     "system_turns", "user_turns", "assistant_turns", "multi_turn", "content_tokens")
PACK_WINDOW = 4096  # conversations packed together: best fit over this many, memory bounded


def chat_seq_len(s: PrepareSettings) -> tuple[int, str]:
    """(seq_len, where it came from): --seq-len, else the --tokenizer-from run's model.seq_len, else the default."""
    if s.seq_len:
        return s.seq_len, "--seq-len"
    if s.tokenizer_from and (Path(s.tokenizer_from) / "config.toml").is_file():
        path = Path(s.tokenizer_from) / "config.toml"
        return config_mod.load(path).model.seq_len, str(path)
    return DEFAULT_CHAT_SEQ_LEN, "default"


def best_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack items (their lengths, each <= capacity) into rows: best-fit decreasing, deterministic.

    Longest first, each into the row with the least room that still holds it (a new row if none
    does); rows come back ordered by their first item, each row's items in input order."""
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room > lengths[i]:
            bisect.insort(free, (room - lengths[i], r))
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def _chat_read_pass(records, kept_path: Path, progress: _Progress, total_bytes: int):
    """Check, clean and exact-dedup conversations; kept ones go to `kept_path` as {"s", "m", "n"} lines.

    Returns what read_pass does: counts (input, dropped per reason), and per kept conversation its
    split key (from its group when it has one, else from the conversation), bytes, val-source flag."""
    dropped = {r: {"documents": 0, "bytes": 0} for r in CHAT_DROP_REASONS}
    inp = {"documents": 0, "bytes": 0}
    per_file: dict[str, Counter] = {}
    seen: set[bytes] = set()
    keys, sizes, from_val_source = array("Q"), array("Q"), bytearray()
    raw = 0
    with open(kept_path, "w", encoding="utf-8") as kept:
        for is_val_source, rec in records:
            raw += rec.nbytes
            reason, nbytes = rec.reason, rec.nbytes
            if reason is None:
                try:
                    messages = [{**m, "content": clean_text(m["content"])} for m in check_messages(rec.messages)]
                    if not all(m["content"] for m in messages):
                        raise ChatError("empty_content", "after cleaning")
                    nbytes = sum(len(m["content"].encode("utf-8")) for m in messages)
                    d = digest(render_text(messages))
                    if d in seen:
                        reason = "exact_duplicate"
                except ChatError as e:
                    reason = e.reason
            file_counts = per_file.setdefault(rec.file, Counter())
            file_counts[reason or "valid"] += 1
            inp["documents"] += 1
            inp["bytes"] += nbytes
            if reason is not None:
                dropped[reason]["documents"] += 1
                dropped[reason]["bytes"] += nbytes
            else:
                seen.add(d)
                kept.write(json.dumps({"s": rec.source, "m": messages, "n": nbytes}, ensure_ascii=False) + "\n")
                key = digest(rec.group) if rec.group else d
                keys.append(int.from_bytes(key[:8], "little"))
                sizes.append(nbytes)
                from_val_source.append(is_val_source)
            progress(stage="read", docs=inp["documents"], bytes=inp["bytes"],
                     fraction=min(1.0, raw / total_bytes) if total_bytes else None)
    progress(force=True, stage="read", docs=inp["documents"], bytes=inp["bytes"], fraction=1.0)
    for file, c in per_file.items():
        if not c["valid"] and c["exact_duplicate"] == 0:
            why = ", ".join(f"{r}={n}" for r, n in sorted(c.items()))
            raise DataError(f"no valid conversation in {file} ({why}); see `workbench prepare --help` for the shapes")
    return {"input": inp, "dropped": dropped}, keys, sizes, from_val_source


def _chat_encode_pass(kept_path: Path, template: ChatTemplate, is_val: np.ndarray, out: Path, seq_len: int,
                      threads: int, dropped: dict, progress: _Progress) -> tuple[dict, dict]:
    """Render kept conversations, truncate to a row, pack them best-fit into rows of seq_len + 1 tokens
    padded with <|pad|> (mask 0), and write {train,val}.bin, {train,val}_mask.bin and the val_docs files.

    Returns (splits, chat counts per split); a conversation truncated to no trained token is dropped."""
    row_len = seq_len + 1
    tok = template.tokenizer
    token_bytes = tok.token_bytes()
    splits = {name: {"documents": 0, "bytes": 0, "tokens": 0} for name in ("train", "val")}
    counts = {name: Counter(dict.fromkeys(CHAT_SPLIT_COUNTS, 0)) for name in ("train", "val")}
    pending: dict[str, list] = {"train": [], "val": []}
    val_rows: list[tuple[int, int, int]] = []
    n_docs = len(is_val)
    with ShardWriter(out / "train.bin", tok.vocab_size) as train_w, \
            ShardWriter(out / "train_mask.bin", tok.vocab_size, np.uint8) as train_mask_w, \
            ShardWriter(out / "val.bin", tok.vocab_size) as val_w, \
            ShardWriter(out / "val_mask.bin", tok.vocab_size, np.uint8) as val_mask_w, \
            open(out / "val_docs.jsonl", "w", encoding="utf-8") as val_meta:
        writers = {"train": (train_w, train_mask_w), "val": (val_w, val_mask_w)}

        def flush(split: str) -> None:
            items, pending[split] = pending[split], []
            ids_w, mask_w = writers[split]
            for row in best_fit_rows([len(ids) for ids, _, _ in items], row_len):
                ids = np.full(row_len, template.pad_id, dtype=np.int32)
                mask = np.zeros(row_len, dtype=np.uint8)
                pos = 0
                for i in row:
                    conv_ids, conv_mask, doc = items[i]
                    n = len(conv_ids)
                    ids[pos:pos + n], mask[pos:pos + n] = conv_ids, conv_mask
                    if split == "val":
                        val_rows.append((splits["val"]["tokens"] + pos, n, int(token_bytes[conv_ids].sum())))
                        preview = render_text(doc["m"])[:PREVIEW_CHARS]
                        val_meta.write(json.dumps({"source": doc["s"], "preview": preview}, ensure_ascii=False) + "\n")
                    pos += n
                ids_w.write(ids)
                mask_w.write(mask)
                splits[split]["tokens"] += row_len
                counts[split]["rows"] += 1
                counts[split]["padding_tokens"] += row_len - pos

        index = 0
        docs = _kept_docs(kept_path)
        while batch := list(itertools.islice(docs, PACK_WINDOW)):
            for doc, (ids, mask) in zip(batch, template.render_many([d["m"] for d in batch], threads), strict=True):
                split = "val" if is_val[index] else "train"
                index += 1
                c = counts[split]
                c["content_tokens"] += len(ids) - 1 - 2 * len(doc["m"])  # for bytes per token: no specials
                if len(ids) > row_len:
                    c["truncated"] += 1
                    c["truncated_tokens"] += len(ids) - row_len
                    ids, mask = ids[:row_len], mask[:row_len]
                    if not mask.any():
                        dropped["truncated_to_nothing"]["documents"] += 1
                        dropped["truncated_to_nothing"]["bytes"] += doc["n"]
                        continue
                for m in doc["m"]:
                    c[m["role"] + "_turns"] += 1
                c["multi_turn"] += sum(m["role"] == "assistant" for m in doc["m"]) > 1
                c["trained_tokens"] += int(mask.sum())
                c["untrained_tokens"] += len(mask) - int(mask.sum())
                splits[split]["documents"] += 1
                splits[split]["bytes"] += doc["n"]
                pending[split].append((ids, mask, doc))
            for split in ("train", "val"):
                if len(pending[split]) >= PACK_WINDOW:
                    flush(split)
            progress(stage="encode", docs=index, bytes=splits["train"]["bytes"] + splits["val"]["bytes"],
                     fraction=index / n_docs)
        flush("train")
        flush("val")
    np.save(out / "val_docs.npy", np.array(val_rows, dtype=np.int64).reshape(-1, 3))
    for split in ("train", "val"):
        if not splits[split]["documents"]:
            raise DataError(f"no {split} conversation left: every one was too long for --seq-len {seq_len} "
                            "to keep an assistant token; raise --seq-len")
    return splits, counts


def _prepare_chat(paths, val_paths, s: PrepareSettings, tmp: Path, reused, threads: int,
                  report_progress: _Progress) -> dict:
    """Chat data into `tmp` (the three passes of the module docstring, for conversations); returns the report.

    1. read: chat records (and the built-in conversations with `builtin_chat`) are checked by the
       template's rules, their contents cleaned, exact duplicates dropped, each reason counted; a
       file with no valid conversation is an error. No quality filters or near dedup: a short
       answer is a good answer, and phrasings of one question are meant to be alike.
    2. the tokenizer, reused (the usual case: the base run's) or trained on the train contents.
    3. encode: rendered (workbench.engine.chat), truncated to a row, packed best-fit (PACK_WINDOW at
       a time) into rows of seq_len + 1 tokens, each starting with <|bos|>; chat.json records the layout.
    The val split is held out by conversation (by its group, for the built-in data: whole modules)."""
    started = time.monotonic()
    stats: Counter = Counter()
    records = ((False, r) for r in read_chat_records(paths, stats))
    if s.builtin_chat:
        records = itertools.chain(((False, r) for r in builtin_conversations()), records)
    if val_paths:
        records = itertools.chain(records, ((True, r) for r in read_chat_records(val_paths, stats)))
    kept_path = tmp / "kept.jsonl"
    counts, keys, sizes, from_val_source = _chat_read_pass(records, kept_path, report_progress,
                                                           _input_size(paths + val_paths))
    stage_seconds = {"read": time.monotonic() - started}
    log = _conversation_log_counts(stats, counts["dropped"])
    if len(keys) < 2:
        why = ", ".join(f"{r}={row['documents']}" for r, row in counts["dropped"].items() if row["documents"])
        raise DataError(f"{len(keys)} of {counts['input']['documents']} conversations left after checks and dedup"
                        + (f" ({why})" if why else "") + "; at least 2 are needed (train and val)")
    is_val = _split(keys, from_val_source, s)

    tok = _choose_tokenizer(reused, kept_path, keys, sizes, is_val, s, stats, threads, report_progress,
                            text=lambda doc: "\n".join(m["content"] for m in doc["m"]))
    stage_seconds["tokenizer"] = time.monotonic() - started - sum(stage_seconds.values())

    template = ChatTemplate(tok)
    seq_len, seq_len_from = chat_seq_len(s)
    splits, per_split = _chat_encode_pass(kept_path, template, is_val, tmp, seq_len, threads, counts["dropped"],
                                          report_progress)
    stage_seconds["encode"] = time.monotonic() - started - sum(stage_seconds.values())
    kept_path.unlink()
    kept = {k: splits["train"][k] + splits["val"][k] for k in ("documents", "bytes", "tokens")}
    content_tokens = per_split["train"]["content_tokens"] + per_split["val"]["content_tokens"]
    bytes_per_token = kept["bytes"] / max(1, content_tokens)
    tok.save(tmp, bytes_per_token=round(bytes_per_token, 4))
    chat = {
        "version": CHAT_FORMAT_VERSION,
        "template": template.name,
        "seq_len": seq_len,
        "seq_len_from": seq_len_from,
        "row_tokens": seq_len + 1,
        "pad_id": template.pad_id,
        "rows": {split: per_split[split]["rows"] for split in per_split},
        "conversations": {split: splits[split]["documents"] for split in splits},
        "trained_tokens": {split: per_split[split]["trained_tokens"] for split in per_split},
    }
    (tmp / "chat.json").write_text(json.dumps(chat, indent=2) + "\n")
    sources = ([BUILTIN_CHAT_SOURCE] if s.builtin_chat else []) + list(paths)
    report = _report(sources, val_paths, s, stats, counts, splits, kept, tok, bytes_per_token, stage_seconds,
                     started, threads=threads)
    report["chat"] = {**chat, "per_split": {split: dict(c) for split, c in per_split.items()},
                      "dropped": {r: row["documents"] for r, row in counts["dropped"].items() if row["documents"]},
                      "reasons": {r: CHAT_DROP_REASONS[r] for r, row in counts["dropped"].items() if row["documents"]}}
    if log:
        report["chat"]["conversation_log"] = log
    return report


def _conversation_log_counts(stats: Counter, dropped: dict) -> dict:
    """What the conversation logs among the sources gave (sources.py), moved out of `stats`; {} when none:
    conversations, used, replies_corrected, cut_at_bad_reply, left_out by reason, skipped_lines by why."""
    found = {k[len(LOG_PREFIX):]: stats.pop(k) for k in sorted(stats) if k.startswith(LOG_PREFIX)}
    if not found:
        return {}
    log = {k: found.get(k, 0) for k in ("conversations", "used", "replies_corrected", "cut_at_bad_reply")}
    log["left_out"] = {r: dropped[r]["documents"] for r in ("rated_bad", "no_reply")}
    log["skipped_lines"] = {k.split(".", 1)[1]: n for k, n in found.items() if k.startswith("skipped_lines.")}
    return log


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

"""Read documents from files, folders and JSONL, streaming, with counts of what was skipped.

How files become documents:
- A .txt / .md file (or any file given explicitly that is not .jsonl) is cut into
  documents at paragraph boundaries (blank lines): paragraphs are gathered until the
  document reaches `doc_chars` characters. A file smaller than that is one document.
  With no blank line between 1x and 2x `doc_chars`, the cut is at the first line end
  past 1x (before 4x), and failing that mid-line at 4x, so no document grows without
  bound and memory stays bounded whatever the file holds (a 1 MB read block plus 4x
  `doc_chars`). The same cuts apply to a long JSONL text.
- A .jsonl file gives one document per line: `{"text": "..."}`, or a chat
  `{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}...]}` written with
  the chat special tokens (workbench.engine.data.tokenizer.chat_format). Other lines are counted as malformed.
- Folders are walked recursively in sorted order (hidden entries skipped); only
  .txt, .md, .markdown, .text and .jsonl files are read, others are counted as ignored.
- A file with a NUL byte in its first 8 KiB is binary, a file that is not valid UTF-8 is
  skipped whole: both are counted, never fatal.

A document is `(source, text)`, where source is "path:line" of its first line.
"""

from __future__ import annotations

import codecs
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from workbench.engine.errors import DataError
from workbench.engine.data.tokenizer import chat_format

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
JSONL_SUFFIXES = {".jsonl"}
DEFAULT_DOC_CHARS = 8000


def check_sources(paths: Iterable[str | Path]) -> list[Path]:
    """Fail early, in one line, on a path that does not exist."""
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise DataError(f"source not found: {p}")
        out.append(path)
    return out


def _file_kind(path: Path, stats: Counter) -> bool:
    """True when the file is UTF-8 text; counts binary and non-UTF-8 files it rejects."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            first = True
            while chunk := f.read(1 << 20):
                if first and b"\0" in chunk[:8192]:
                    stats["files_skipped_binary"] += 1
                    return False
                first = False
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        stats["files_skipped_not_utf8"] += 1
        return False
    except OSError:
        stats["files_skipped_unreadable"] += 1
        return False
    return True


def split_documents(blocks: Iterable[str], doc_chars: int) -> Iterator[tuple[int, str]]:
    """Cut a stream of text blocks into (first line index, text) documents (rules in the module doc).

    Searches with str.find over a window of at most 4 x doc_chars plus one block, so a big
    file goes at C speed and memory stays bounded."""
    buf, pos, line = "", 0, 0
    blocks = iter(blocks)
    done = False
    while True:
        while not done and len(buf) - pos < 4 * doc_chars + 2:
            block = next(blocks, None)
            if block is None:
                done = True
            else:
                buf, pos = buf[pos:] + block, 0
        if pos == len(buf):
            return
        if len(buf) - pos <= doc_chars:
            cut = len(buf)
        else:
            cut = buf.find("\n\n", pos + doc_chars - 1, pos + 2 * doc_chars) + 2  # a blank line past doc_chars
            if cut == 1:
                cut = buf.find("\n", pos + doc_chars - 1, pos + 4 * doc_chars) + 1  # else a line end
                if cut == 0:
                    cut = min(len(buf), pos + 4 * doc_chars)  # else mid-line
            while cut < len(buf) and buf[cut] == "\n":  # a run of blank lines stays with its document
                cut += 1
        text, pos = buf[pos:cut], cut
        yield line, text
        line += text.count("\n")


def _text_documents(path: Path, doc_chars: int) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for start, text in split_documents(iter(lambda: f.read(1 << 20), ""), doc_chars):
            yield f"{path}:{start + 1}", text


def _jsonl_documents(path: Path, doc_chars: int, stats: Counter) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                    text = obj["text"]
                elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
                    text = chat_format(obj["messages"])
                else:
                    raise ValueError("no text or messages")
            except ValueError:  # json.JSONDecodeError is a ValueError
                stats["jsonl_malformed_lines"] += 1
                continue
            stats["jsonl_records"] += 1
            if len(text) <= doc_chars:
                yield f"{path}:{lineno}", text
            else:
                for _, part in split_documents([text], doc_chars):
                    yield f"{path}:{lineno}", part


def _walk(path: Path, stats: Counter) -> Iterator[Path]:
    if path.is_file():
        yield path
        return
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES:
                yield Path(root) / name
            else:
                stats["files_ignored_type"] += 1


def read_documents(paths: Iterable[Path], stats: Counter,
                   doc_chars: int = DEFAULT_DOC_CHARS) -> Iterator[tuple[str, str]]:
    """Yield (source, raw text) for every document under `paths`; fills `stats` as it goes."""
    for top in paths:
        for path in _walk(Path(top), stats):
            if not _file_kind(path, stats):
                continue
            stats["files_read"] += 1
            stats["bytes_read"] += path.stat().st_size
            if path.suffix.lower() in JSONL_SUFFIXES:
                yield from _jsonl_documents(path, doc_chars, stats)
            else:
                yield from _text_documents(path, doc_chars)

"""Read documents from files, folders and JSONL, streaming, with counts of what was skipped.

How files become documents:
- A .txt / .md file (or any file given explicitly that is not .jsonl) is cut into
  documents at paragraph boundaries (blank lines): paragraphs are gathered until the
  document reaches `doc_chars` characters. A file smaller than that is one document.
  With no blank line between 1x and 2x `doc_chars`, the cut is at the first line end
  past 1x (before 4x), and failing that mid-line at 4x, so no document grows without
  bound and memory stays bounded whatever the file holds (a 1 MB read block plus 4x
  `doc_chars`). The same cuts apply to a long JSONL text.
- A .jsonl file gives one document per line: `{"text": "..."}`, or a chat record (below)
  flattened into text with the chat special tokens (workbench.engine.chat.render_text), every
  token of it trained. Other lines are counted as malformed.
- Folders are walked recursively in sorted order (hidden entries skipped); only
  .txt, .md, .markdown, .text and .jsonl files are read, others are counted as ignored.
- A file with a NUL byte in its first 8 KiB is binary, a file that is not valid UTF-8 is
  skipped whole: both are counted, never fatal.

A document is `(source, text)`, where source is "path:line" of its first line.

Chat sources. A chat record is `{"messages": [{"role", "content"}...]}` (the OpenAI/TRL
conversational shape) or `{"prompt": ..., "completion": ...}` (TRL prompt-completion: two
strings become a user and an assistant message; lists of messages are joined). A .jsonl file
is a chat file when its first JSON record has `messages` or `prompt`; `source_kind` decides
for a whole prepare: chat when every file is a chat file, plain text when none is (as before:
conversations inside a text-first JSONL are flattened), and an error naming one of each when
they mix. `read_chat_records` reads chat files record by record; a record that is not JSON or
not a conversation is yielded with its reason (CHAT_RECORD_REASONS), never fatal here.

Conversation logs. A run's conversations.jsonl (workbench.engine.conversations) is known by its
records' shape, not its name (a renamed or copied log is still one): its first JSON record has the
log's `schema` and a `type` of "conversation" or "feedback". It is chat data read through
`training_records`: one record per conversation (its latest state, source "path:<conversation id>"),
corrected replies instead of the originals, cut before a reply rated bad; a conversation with nothing
left is yielded with reason "rated_bad" or "no_reply". What the log gave is counted in `stats` under
LOG_PREFIX ("conversation_log.conversations", ".used", ".replies_corrected", ".cut_at_bad_reply",
".skipped_lines.<why>"); prepare moves those into the report's chat section. With --flatten-chat a
log's conversations (the same ones) are flattened like any chat record.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from workbench.engine import conversations as conversation_log
from workbench.engine.chat import ChatError, render_text
from workbench.engine.errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
JSONL_SUFFIXES = {".jsonl"}
DEFAULT_DOC_CHARS = 8000
SNIFF_LINES = 100  # a JSONL file's kind is that of its first JSON record within this many lines
CHAT_RECORD_REASONS = {
    "not_json": "a line that is not a JSON object",
    "not_a_conversation": "a record without messages, or prompt and completion",
    "rated_bad": "a logged conversation with nothing left before its first reply rated bad",
    "no_reply": "a logged conversation with no assistant reply",
}
LOG_PREFIX = "conversation_log."  # the counts of a conversation log's reading, in `stats`


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
                elif (messages := record_messages(obj)) is not None:
                    text = render_text(messages)
                else:
                    raise ValueError("no text or messages")
            except ValueError:  # json.JSONDecodeError and ChatError are ValueErrors
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


def _readable_files(paths: Iterable[Path], stats: Counter) -> Iterator[Path]:
    """Every file under `paths` of a kind we read, counted in `stats` (files_read, bytes_read)."""
    for top in paths:
        for path in _walk(Path(top), stats):
            if _file_kind(path, stats):
                stats["files_read"] += 1
                stats["bytes_read"] += path.stat().st_size
                yield path


def read_documents(paths: Iterable[Path], stats: Counter,
                   doc_chars: int = DEFAULT_DOC_CHARS) -> Iterator[tuple[str, str]]:
    """Yield (source, raw text) for every document under `paths`; fills `stats` as it goes."""
    for path in _readable_files(paths, stats):
        if path.suffix.lower() in JSONL_SUFFIXES and _sniff(path) == "log":
            for rec in _log_records(path, stats):
                if rec.messages:
                    yield rec.source, render_text(rec.messages)
        elif path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, doc_chars, stats)
        else:
            yield from _text_documents(path, doc_chars)


def record_messages(obj) -> list | None:
    """The messages of a chat record (unchecked: see workbench.engine.chat.check_messages), or None
    when `obj` is no chat record at all; ChatError("not_a_list") when its messages are not a list."""
    if isinstance(obj, dict) and "messages" in obj:
        messages = obj["messages"]
    elif isinstance(obj, dict) and "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        messages = prompt + completion
    else:
        return None
    if not isinstance(messages, list) or not messages:
        raise ChatError("not_a_list")
    return messages


def _is_log_record(obj) -> bool:
    return (isinstance(obj, dict) and obj.get("schema") == conversation_log.SCHEMA
            and obj.get("type") in ("conversation", "feedback") and isinstance(obj.get("id"), str))


def _jsonl_kind(path: Path) -> str | None:
    """"chat" or "text" by the first JSON record of a .jsonl file; None when there is none to go by."""
    kind = _sniff(path)
    return "chat" if kind == "log" else kind


def _sniff(path: Path) -> str | None:
    """"log" (a conversation log), "chat" or "text" by the first JSON record of a .jsonl file, or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in itertools.islice(f, SNIFF_LINES):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if _is_log_record(obj):
                    return "log"
                if isinstance(obj, dict) and ("messages" in obj or "prompt" in obj):
                    return "chat"
                if isinstance(obj, dict) and "text" in obj:
                    return "text"
    except OSError:
        return None
    return None


def source_kind(paths: Iterable[Path]) -> str:
    """"chat" or "text" for the files under `paths` (rules in the module doc); DataError when they mix."""
    found: dict[str, Path] = {}
    for top in paths:
        for path in _walk(Path(top), Counter()):
            kind = _jsonl_kind(path) if path.suffix.lower() in JSONL_SUFFIXES else "text"
            if kind is not None:
                found.setdefault(kind, path)
            if len(found) == 2:
                break
    if len(found) == 2:
        raise DataError(f"the sources mix chat ({found['chat']}) and plain text ({found['text']}): prepare them "
                        "separately, or pass --flatten-chat to train every token of the conversations as text")
    return "chat" if "chat" in found else "text"


@dataclass
class ChatRecord:
    """One line of a chat source: its messages (unchecked), or None and why not."""

    source: str  # "path:line", or "builtin-chat:..." for the built-in conversations
    messages: list | None
    reason: str | None = None  # a CHAT_RECORD_REASONS key when messages is None
    nbytes: int = 0  # the line's UTF-8 bytes
    group: str | None = None  # conversations of one group land in the same split (None: by conversation)

    @property
    def file(self) -> str:
        return self.source.rsplit(":", 1)[0]


def read_chat_records(paths: Iterable[Path], stats: Counter) -> Iterator[ChatRecord]:
    """Every record of the chat files under `paths`; fills `stats` as read_documents does."""
    for path in _readable_files(paths, stats):
        if path.suffix.lower() in JSONL_SUFFIXES and _sniff(path) == "log":
            yield from _log_records(path, stats)
            continue
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                source, nbytes = f"{path}:{lineno}", len(line.encode("utf-8"))
                stats["jsonl_records"] += 1
                try:
                    obj = json.loads(line)
                except ValueError:
                    yield ChatRecord(source, None, "not_json", nbytes)
                    continue
                try:
                    messages = record_messages(obj)
                except ChatError as e:
                    yield ChatRecord(source, None, e.reason, nbytes)
                    continue
                reason = "not_a_conversation" if messages is None else None
                yield ChatRecord(source, messages, reason, nbytes)


def _log_records(path: Path, stats: Counter) -> Iterator[ChatRecord]:
    """A conversation log's conversations as chat records (the module doc's rules), counted in `stats`."""
    skipped: dict[str, int] = {}
    for r in conversation_log.training_records(path, skipped):
        messages = r["messages"] or None
        nbytes = sum(len(str(m.get("content", "")).encode("utf-8")) for m in r["messages"])
        stats["jsonl_records"] += 1
        stats[LOG_PREFIX + "conversations"] += 1
        stats[LOG_PREFIX + "used"] += messages is not None
        stats[LOG_PREFIX + "replies_corrected"] += r["corrected"]
        stats[LOG_PREFIX + "cut_at_bad_reply"] += bool(messages and r["cut_at_bad"])
        yield ChatRecord(f"{path}:{r['id']}", messages, r["left_out"], nbytes)
    for why, n in skipped.items():
        stats[LOG_PREFIX + "skipped_lines." + why] += n

"""Conversations are data: every chat (CLI, TUI, HTTP, socket) is kept in the run's `conversations.jsonl`.

One JSON object per line, each written whole and made durable (write + flush + fsync) before the
reply is considered given; a line cut short by a crash is skipped by the reader. Two kinds of line:

    {"schema": 1, "type": "conversation", "id": "c-...", "t": 1733090000.0, "source": "cli" | "http" | ...,
     "checkpoint": "step_000020", "settings": {"temperature": 0.8, "top_p": 1.0, "max_tokens": 64, ...},
     "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     "finish": "stop" | "length", "dropped": 0}
        the whole conversation after each reply (the last line of an id is its latest state);
    {"schema": 1, "type": "feedback", "id": "c-...", "t": ..., "index": 3,
     "rating": "good" | "bad" | null, "correction": "the reply it should have given" | null}
        about messages[index] (an assistant message) of conversation `id`; a later line overrides.

`training_conversations(path)` (or `training_records`, the same with what was corrected or left out)
is what `workbench prepare --source runs/X/conversations.jsonl` reads:
each conversation as a `messages` list, corrected replies instead of the originals, and the
conversation cut before any reply rated bad (with the user turn that asked for it).
This module imports no torch.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

SCHEMA = 1
FILENAME = "conversations.jsonl"
RATINGS = ("good", "bad")


def path_of(run: str | Path) -> Path:
    return Path(run) / FILENAME


def new_id() -> str:
    return "c-" + uuid.uuid4().hex[:16]


def append_line(path: str | Path, record: dict) -> None:
    """Append one whole line and make it durable: O_APPEND writes of one buffer do not interleave."""
    data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # a short write (full disk): the reader skips the torn line
            raise OSError(f"short write to {path} ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def record_conversation(run: str | Path, conv_id: str, messages: list[dict], *, source: str, checkpoint: str,
                        settings: dict, finish: str | None = None, dropped: int = 0) -> None:
    """The conversation's latest state (all of it, the newest reply last)."""
    append_line(path_of(run), {"schema": SCHEMA, "type": "conversation", "id": conv_id, "t": time.time(),
                               "source": source, "checkpoint": checkpoint, "settings": settings,
                               "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                               "finish": finish, "dropped": dropped})


def record_feedback(run: str | Path, conv_id: str, index: int, *, rating: str | None = None,
                    correction: str | None = None) -> None:
    """Feedback on messages[index] (an assistant reply): good or bad, and/or the reply it should have given."""
    if rating is not None and rating not in RATINGS:
        raise ValueError(f"rating must be one of {RATINGS} or None, got {rating!r}")
    append_line(path_of(run), {"schema": SCHEMA, "type": "feedback", "id": conv_id, "t": time.time(),
                               "index": int(index), "rating": rating, "correction": correction})


def read_records(path: str | Path, skipped: dict | None = None) -> Iterator[dict]:
    """Every well-formed line of this schema, in order; torn or foreign lines are skipped (and counted in
    `skipped`, when given: "torn_last_line", "not_json", "foreign")."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    skipped = {} if skipped is None else skipped
    with f:
        for raw in f:
            if not raw.endswith(b"\n"):
                skipped["torn_last_line"] = skipped.get("torn_last_line", 0) + 1
                return  # the last line, still being written or cut by a crash
            try:
                record = json.loads(raw)
            except ValueError:
                skipped["not_json"] = skipped.get("not_json", 0) + 1
                continue
            if isinstance(record, dict) and record.get("schema") == SCHEMA and isinstance(record.get("id"), str):
                yield record
            elif raw.strip():
                skipped["foreign"] = skipped.get("foreign", 0) + 1


def conversations(path: str | Path, skipped: dict | None = None) -> list[dict]:
    """Each conversation's latest state, first-seen order, with `feedback`: {index: {"rating", "correction"}}."""
    convs: dict[str, dict] = {}
    feedback: dict[str, dict[int, dict]] = {}
    for r in read_records(path, skipped):
        if r.get("type") == "conversation" and isinstance(r.get("messages"), list):
            convs[r["id"]] = r
        elif r.get("type") == "feedback" and isinstance(r.get("index"), int):
            fb = feedback.setdefault(r["id"], {}).setdefault(r["index"], {"rating": None, "correction": None})
            for key in ("rating", "correction"):
                if r.get(key) is not None:
                    fb[key] = r[key]
    return [{**c, "feedback": feedback.get(cid, {})} for cid, c in convs.items()]


def training_records(path: str | Path, skipped: dict | None = None) -> Iterator[dict]:
    """Each conversation of the log, for chat data: {"id", "messages", "corrected", "cut_at_bad", "left_out"}.

    `messages` is what training_conversations yields ([] when left out); `corrected` the number of replies
    replaced by their correction; `cut_at_bad` True when a reply rated bad cut it short; `left_out` None,
    "rated_bad" (nothing left before its first reply rated bad) or "no_reply" (no assistant reply at all)."""
    for conv in conversations(path, skipped):
        out, corrected, cut_at_bad = [], 0, False
        for i, m in enumerate(conv["messages"]):
            if not isinstance(m, dict):
                break
            fb = conv["feedback"].get(i, {})
            if m.get("role") == "assistant":
                if isinstance(fb.get("correction"), str) and fb["correction"].strip():
                    m = {"role": "assistant", "content": fb["correction"]}
                    corrected += 1
                elif fb.get("rating") == "bad":
                    if out and out[-1].get("role") == "user":
                        out.pop()
                    cut_at_bad = True
                    break
            out.append({"role": m.get("role"), "content": m.get("content")})
        if any(m["role"] == "assistant" for m in out):
            while out and out[-1]["role"] != "assistant":
                out.pop()
            left_out = None
        else:
            out, corrected, left_out = [], 0, "rated_bad" if cut_at_bad else "no_reply"
        yield {"id": conv["id"], "messages": out, "corrected": corrected, "cut_at_bad": cut_at_bad,
               "left_out": left_out}


def training_conversations(path: str | Path) -> Iterator[list[dict]]:
    """Conversations as `messages` lists for chat data: corrections replace replies, and a conversation
    stops before its first reply rated bad (a corrected reply counts as fixed, whatever its rating).
    Conversations left without an assistant reply are skipped; the roles are checked by the data pipeline."""
    for record in training_records(path):
        if record["left_out"] is None:
            yield record["messages"]

"""events.jsonl: the run's append-only history, one JSON object a line.

Every event has "v" (schema version), "t" (unix time) and "type"
(state, step, eval, sample, checkpoint, system, log, error). The writer appends
whole lines under a lock and flushes each one, so a reader never waits long and a
crash leaves at worst one torn last line, which readers skip until it is completed.
This module imports no torch: the TUI and the client read events through it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
EVENT_TYPES = ("state", "step", "eval", "sample", "checkpoint", "system", "log", "error")
STATES = ("starting", "running", "paused", "finished", "stopped", "crashed")


class EventWriter:
    """Append events to a run's events.jsonl; safe to share between threads."""

    def __init__(self, path: str | Path, echo=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if _ends_torn(self.path):  # a crash mid-line: end it, or our first event would be glued to it and lost
            self._file.write("\n")
        self._lock = threading.Lock()
        self.echo = echo  # optional callable(event) for foreground printing

    def emit(self, type: str, **fields: Any) -> dict[str, Any]:
        assert type in EVENT_TYPES, type
        event = {"v": SCHEMA_VERSION, "t": round(time.time(), 3), "type": type, **fields}
        line = json.dumps(event, separators=(",", ":"), allow_nan=False, default=str) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
        if self.echo is not None:
            self.echo(event)
        return event

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()


def _ends_torn(path: Path) -> bool:
    """The file's last line has no newline (its writer died while writing it)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_events(path: str | Path, offset: int = 0,
                max_bytes: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Read complete events from byte `offset`; return them and the offset to continue from.

    A torn last line (no newline yet) is left for the next call; a line that is
    not valid JSON (a crash mid-write, then more appends) is skipped. With
    `max_bytes`, read about that much (whole lines only) so that replaying a huge
    history takes bounded memory; call again from the returned offset for more.
    """
    events: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read() if max_bytes is None else f.read(max_bytes)
            if max_bytes is not None and len(data) == max_bytes and b"\n" not in data:
                data += f.readline()  # one line longer than max_bytes: take it whole
    except FileNotFoundError:
        return events, offset
    end = data.rfind(b"\n")
    if end < 0:
        return events, offset
    for raw in data[: end + 1].splitlines():
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict) and "type" in event:
            events.append(event)
    return events, offset + end + 1


def follow_events(path: str | Path, offset: int = 0, poll: float = 0.2,
                  stop=None) -> Iterator[dict[str, Any]]:
    """Yield every event from `offset`, then keep yielding new ones as they are appended.

    `stop` is an optional callable; following ends when it returns True.
    """
    while True:
        events, offset = read_events(path, offset)
        yield from events
        if stop is not None and stop():
            return
        if not events:
            time.sleep(poll)


def last_state(path: str | Path) -> str | None:
    """The most recent `state` event's state, or None if the run never reported one."""
    events, _ = read_events(path)
    for event in reversed(events):
        if event["type"] == "state":
            return event.get("state")
    return None

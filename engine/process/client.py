"""Talk to a run's engine and read its history: the library the CLI and the TUI use.

    request(run, "pause")               one request over the control socket, one reply
    follow(run, offset)                 every event from `offset`, then live ones as they come
    run_state(run)                      running | paused | starting | finished | stopped | crashed | new
    list_runs("runs")                   one summary per run folder

Whether an engine is alive is decided by the run's lock (the engine holds
`engine.lock` with flock for its whole life; the kernel drops it when the process
dies, kill -9 included) and by the pid in `engine.pid`. A run whose last state
says running but whose engine is gone is reported `crashed`, never `running`.
This module imports no torch (the TUI must start in well under a second).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from workbench.engine import events as schema
from workbench.engine.errors import WorkbenchError
from workbench.engine.events import AnyEvent, EventReader
from workbench.engine.process.server import socket_address
from workbench.engine.rundir import RunDir

TERMINAL_STATES = ("finished", "stopped", "crashed")
FOLLOW_CHUNK = 4 << 20  # bytes of events.jsonl read at a time


class EngineNotRunning(WorkbenchError):
    """There is no engine to talk to for this run."""


class EngineError(WorkbenchError):
    """The engine refused or failed a request; the message is the engine's."""


def _run(run_dir: str | Path | RunDir) -> RunDir:
    return run_dir if isinstance(run_dir, RunDir) else RunDir.at(run_dir)


# ---- is an engine alive? ----------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """True if `pid` is a live process (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): trust kill(0)


def engine_pid(run_dir) -> int | None:
    try:
        return int(_run(run_dir).pid.read_text().strip())
    except (OSError, ValueError):
        return None


def lock_held(run_dir) -> bool:
    """True if some process holds the run's engine lock (probed without taking it for long)."""
    try:
        fd = os.open(_run(run_dir).lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our probe lock, if we got it
    return False


def engine_alive(run_dir) -> bool:
    """True while the run's engine process lives (lock held, and its pid, if written, alive)."""
    if not lock_held(run_dir):
        return False
    pid = engine_pid(run_dir)
    return pid is None or pid_alive(pid)


# ---- reading events.jsonl ------------------------------------------------------------

def _scan_back(f, wanted: dict[str, bytes], start: int, end: int, block: int) -> dict[str, dict]:
    """The last event per name in `wanted` among the complete lines of f[start:end], read backwards.

    Only lines that are events of the current schema count (workbench.engine.events.current);
    they are kept as stored, so that what upgrading needs from other lines can be added later.
    """
    found: dict[str, dict] = {}
    carry = b""
    while end > start and len(found) < len(wanted):
        lo = max(start, end - block)
        f.seek(lo)
        data = f.read(end - lo) + carry
        lines = data.split(b"\n")
        carry = lines.pop(0) if lo > start else b""  # maybe cut in half: kept for the next block
        for raw in reversed(lines):
            for name, needle in wanted.items():
                if name in found or needle not in raw:
                    continue
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue  # a line spoilt by a crash mid-write
                if schema.current(event) is not None:
                    found[name] = event
        end = lo
    return found


def _complete_end(f, size: int) -> int:
    """The offset just past the last newline: what follows it is a line still being written."""
    end = size
    while end > 0:
        lo = max(0, end - 65536)
        f.seek(lo)
        nl = f.read(end - lo).rfind(b"\n")
        if nl >= 0:
            return lo + nl + 1
        end = lo
    return 0


def tail_events(path: str | Path, wanted: dict[str, bytes], block: int = 1 << 18) -> dict[str, AnyEvent]:
    """For each name in `wanted`, the last event whose line contains its byte string, as an event
    of the current schema (an older run's upgraded: workbench.engine.events.current).

    The file is read backwards a block at a time and only matching lines are parsed.
    Results are remembered per file, so asking again (the TUI asks every second)
    reads only what was appended since: events.jsonl only ever grows.
    """
    found = _tail_stored(path, wanted, block)
    seen: dict[str, str] = {}
    if any(schema.needs_context(e) for e in found.values()):  # an old run's: what its upgrade learns from
        for e in _tail_stored(path, schema.V1_CONTEXT, block).values():
            schema.current(e, seen)
    return {name: schema.current(e, seen) for name, e in found.items()}


def _tail_stored(path: str | Path, wanted: dict[str, bytes], block: int) -> dict[str, dict]:
    """tail_events' search: the events as stored, remembered per file and `wanted`."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return {}
    with f:
        st = os.fstat(f.fileno())
        key = (str(path), tuple(sorted(wanted.items())))
        with _tail_lock:
            inode, scanned, known = _tail_cache.get(key, (None, 0, {}))
        if inode != (st.st_dev, st.st_ino) or st.st_size < scanned:
            scanned, known = 0, {}  # a new or replaced file
        end = _complete_end(f, st.st_size)
        newer = _scan_back(f, wanted, scanned, end, block) if end > scanned else {}
        found = {**known, **newer}
    with _tail_lock:
        if len(_tail_cache) > 1024:
            _tail_cache.clear()
        _tail_cache[key] = ((st.st_dev, st.st_ino), end, found)
    return dict(found)


_tail_cache: dict[tuple, tuple] = {}  # (path, wanted) -> ((dev, inode), complete bytes scanned, found)
_tail_lock = threading.Lock()


def of_type(kind: str) -> bytes:
    """The byte string that marks an event of `kind` (EventWriter writes compact JSON)."""
    return f'"type":"{kind}"'.encode()


def state_of(last_state: dict | None, alive: bool, engine_started: float | None = None) -> str:
    """A run's state from its last `state` event, whether its engine lives, and when that engine started.

    A live engine whose last recorded state is terminal is either just exiting (the
    event is newer than the engine) or resuming the run and not yet past its imports
    (the event is older than the engine): `starting`.
    """
    state = (last_state or {}).get("state")
    if alive:
        if state in TERMINAL_STATES:
            older = engine_started is not None and (last_state or {}).get("t", 0) < engine_started
            return "starting" if older else state
        return state if state in ("paused", "starting") else "running"
    if state in TERMINAL_STATES:
        return state
    return "crashed" if state is not None else "new"


def _engine_started(run: RunDir) -> float | None:
    try:
        return run.pid.stat().st_mtime
    except OSError:
        return None


def run_state(run_dir) -> str:
    """running | paused | starting | finished | stopped | crashed, or new if it never started."""
    run = _run(run_dir)
    alive = engine_alive(run)
    last = tail_events(run.events, {"state": of_type("state")}).get("state")
    return state_of(last, alive, _engine_started(run))


def follow(run_dir, offset: int = 0, *, poll: float = 0.2, stop: Callable[[], bool] | None = None,
           until_done: bool = False) -> Iterator[AnyEvent]:
    """Every event from byte `offset` (the history), then new ones as the engine writes them,
    as events of the current schema (workbench.engine.events.EventReader).

    A torn last line is left until it is complete. With `until_done`, following
    ends once the engine is gone and everything it wrote has been read; `stop`
    (a callable) ends it early. The reader only reads the file: however slow it
    is, the engine never waits for it.
    """
    reader = EventReader(_run(run_dir).events, offset)
    while True:
        start = reader.offset
        yield from reader.read(max_bytes=FOLLOW_CHUNK)  # a long history in bounded memory
        if stop is not None and stop():
            return
        if reader.offset - start >= FOLLOW_CHUNK // 2:
            continue  # more history to replay
        if until_done and not engine_alive(run_dir):
            while True:  # what it wrote just before it went
                start = reader.offset
                yield from reader.read(max_bytes=FOLLOW_CHUNK)
                if reader.offset == start:
                    return
        # Caught up: wait a beat even if events came, so a busy run is read in batches of
        # `poll` seconds rather than a line at a time (a reader's CPU is CPU the engine may need).
        time.sleep(poll)


# ---- the control socket --------------------------------------------------------------

def connect(run_dir, timeout: float = 5.0) -> socket.socket:
    """A connected socket to the run's engine, or EngineNotRunning with the run's state."""
    run = _run(run_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        with socket_address(run.socket) as address:
            while True:
                try:
                    sock.connect(address)
                    break
                except BlockingIOError:  # the engine's accept queue is full for a moment
                    if time.monotonic() > deadline:
                        raise EngineError(f"the engine of {run.root} is not accepting connections") from None
                    time.sleep(0.01)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        sock.close()
        if not run.root.is_dir():
            raise EngineNotRunning(f"no run folder at {run.root}") from None
        raise EngineNotRunning(f"no engine is running for {run.root} (state: {run_state(run)})") from None
    except BaseException:
        sock.close()
        raise
    return sock


def request(run_dir, op: str, *, timeout: float = 60.0, check: bool = True, **args: Any) -> dict[str, Any]:
    """Send one request and return the engine's reply (a dict with `ok`).

    Raises EngineNotRunning if there is no engine, and EngineError when the reply
    is not ok (unless check=False) or does not come within `timeout` seconds.
    """
    rid = uuid.uuid4().hex[:12]
    line = json.dumps({"id": rid, "op": op, **args}, allow_nan=False).encode() + b"\n"
    with connect(run_dir, timeout=min(timeout, 5.0)) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(line)
            with sock.makefile("rb") as f:
                raw = f.readline()
        except TimeoutError:
            raise EngineError(f"the engine did not answer {op!r} within {timeout:g} s") from None
        except (BrokenPipeError, ConnectionResetError):
            raw = b""
    if not raw:
        raise EngineNotRunning(f"the engine closed the connection before answering {op!r} "
                               f"(state: {run_state(run_dir)})")
    reply = json.loads(raw)
    if reply.get("id") != rid:
        raise EngineError(f"the engine answered another request (id {reply.get('id')!r})")
    if check and not reply.get("ok"):
        raise EngineError(f"{op}: {reply.get('error', 'failed')}")
    return reply


# ---- many runs -----------------------------------------------------------------------

def _max_steps(run: RunDir) -> int | None:
    try:
        with open(run.config, "rb") as f:
            return tomllib.load(f).get("train", {}).get("max_steps")
    except (OSError, tomllib.TOMLDecodeError):
        return None


RUNNING = b'"state":"running"'  # the line of a running `state` event, which names the device


def run_summary(run_dir) -> dict[str, Any]:
    """name, path, state, step, max_steps, train/val loss, tokens/s, device and age of one run.

    The device is the one the last `running` state names; every value the run has not
    reported yet is None.
    """
    run = _run(run_dir)
    last = tail_events(run.events, {"state": of_type("state"), "step": of_type("step"), "eval": of_type("eval"),
                                    "running": RUNNING})
    step, ev, running = last.get("step"), last.get("eval"), last.get("running")
    try:
        updated = run.events.stat().st_mtime
    except OSError:
        updated = run.config.stat().st_mtime if run.config.exists() else None
    return {
        "name": run.name,
        "path": str(run.root),
        "state": state_of(last.get("state"), engine_alive(run), _engine_started(run)),
        "step": step["step"] if step else None,
        "max_steps": step["max_steps"] if step else _max_steps(run),
        "train_loss": step["loss"] if step else None,
        "val_loss": ev["val_loss"] if ev else None,
        "tokens_per_s": step["tokens_per_s"] if step else None,
        "device": running.get("device") if running else None,
        "age_s": None if updated is None else max(0.0, time.time() - updated),
    }


def list_runs(root: str | Path = "runs") -> list[dict[str, Any]]:
    """A summary of every run folder under `root` (newest activity first)."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [run_summary(p) for p in root.iterdir()
            if p.is_dir() and ((p / "config.toml").exists() or (p / "events.jsonl").exists())]
    return sorted(runs, key=lambda r: (r["age_s"] is None, r["age_s"] or 0.0))

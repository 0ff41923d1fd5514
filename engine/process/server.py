"""The engine's control socket: newline-delimited JSON requests over a Unix socket.

A request is one JSON object on one line: {"id": ..., "op": "...", ...arguments}.
The reply is one line that echoes the id: {"id": ..., "ok": true, ...} or
{"id": ..., "ok": false, "error": "..."}. Ops:

    status                     state, step, settings (answered at once)
    pause | resume | stop      stop saves a checkpoint, then the engine ends `stopped`
    save | eval                a checkpoint / a validation pass now
    sample  prompt, max_tokens, temperature, top_k, top_p, seed
    set     values: {"lr_scale": 0.5, "eval.interval": 100, ...}

Requests are checked here (shape, types, ranges) before they reach the engine, so
malformed JSON (nested too deeply included), an unknown op, a wrong type or a line
over MAX_REQUEST_BYTES gets an error reply and changes nothing. Each client has its own thread; the handler
may block (the training thread answers model requests between steps) without
holding up other clients. This module imports no torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

MAX_REQUEST_BYTES = 1 << 20  # one request line; longer ones are refused and skipped
MAX_CLIENTS = 64

# settable live -> (type, lowest allowed, highest allowed, lowest exclusive)
SETTABLE = {
    "lr_scale": (float, 0.0, 100.0, True),
    "eval.interval": (int, 0, 10**9, False),
    "eval.sample_interval": (int, 0, 10**9, False),
    "checkpoint.interval": (int, 0, 10**9, False),
}

# op -> {argument: (check, default)}; a check returns an error message or None
_NUMBER = (int, float)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, _NUMBER) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _is_id(v) -> bool:
    # JSON-RPC's rule: a string, a number or null. The reply echoes it, so it must never be a
    # container (a deeply nested one would make the reply itself fail to encode).
    return v is None or isinstance(v, str) or _is_number(v)


def _shown(value: Any) -> str:
    """A value for an error message: short, and never the repr of a container (which could be
    nested deeper than repr can recurse)."""
    if isinstance(value, (list, dict)):
        return "[...]" if isinstance(value, list) else "{...}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


SAMPLE_ARGS: dict[str, tuple[Callable[[Any], bool], str, Any]] = {
    "prompt": (lambda v: isinstance(v, str) and len(v) <= 20_000, "a string of at most 20000 characters", ""),
    "max_tokens": (lambda v: _is_int(v) and 1 <= v <= 4096, "an integer from 1 to 4096", 64),
    "temperature": (lambda v: _is_number(v) and 0 <= v <= 10, "a number from 0 to 10", 0.8),
    "top_k": (lambda v: v is None or (_is_int(v) and v >= 0), "null or an integer >= 0", None),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", 1.0),
    "seed": (lambda v: v is None or (_is_int(v) and 0 <= v < 2**63), "null or an integer >= 0", None),
}

OPS = ("status", "pause", "resume", "stop", "save", "eval", "sample", "set")


class RequestError(ValueError):
    """A request that is malformed or not allowed; its message goes back to the client."""


def check_setting(key: Any, value: Any) -> int | float:
    if key not in SETTABLE:
        raise RequestError(f"cannot set {key!r} live (settable: {', '.join(SETTABLE)})")
    kind, low, high, low_exclusive = SETTABLE[key]
    ok = _is_int(value) if kind is int else _is_number(value)
    if not ok or value > high or value < low or (low_exclusive and value == low):
        bound = f"> {low}" if low_exclusive else f">= {low}"
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'} {bound} "
                           f"and <= {high}, got {_shown(value)}")
    return kind(value)


def parse_request(line: bytes) -> tuple[Any, str, dict[str, Any]]:
    """(id, op, checked arguments) from one request line; RequestError if it is not acceptable.

    The id is returned even when the rest is wrong, so that the error reply can echo it.
    Nothing here recurses into the parsed values (json.loads itself stops at Python's
    recursion limit), so a request nested 100,000 deep is one more malformed request.
    """
    try:
        request = json.loads(line)
    except RecursionError:
        raise RequestError("malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError("a request must be a JSON object with an op")
    rid = request.get("id")
    if not _is_id(rid):
        raise RequestError(f"the id must be a string, a number or null, got {_shown(rid)}")
    try:
        op = request.get("op")
        if not isinstance(op, str) or op not in OPS:
            raise RequestError(f"unknown op {_shown(op)} (known: {', '.join(OPS)})")
        given = {k: v for k, v in request.items() if k not in ("id", "op")}
        if op == "sample":
            args = {}
            for name, (check, expected, default) in SAMPLE_ARGS.items():
                value = given.pop(name, default)
                if not check(value):
                    raise RequestError(f"sample: {name} must be {expected}, got {_shown(value)}")
                args[name] = value
        elif op == "set":
            values = given.pop("values", None)
            if not isinstance(values, dict) or not values:
                raise RequestError('set: values must be an object such as {"lr_scale": 0.5}')
            args = {"values": {k: check_setting(k, v) for k, v in values.items()}}
        else:
            args = {}
        if given:
            raise RequestError(f"{op}: unexpected argument(s) {', '.join(sorted(map(str, given)))[:200]}")
    except RequestError as e:
        e.request_id = rid
        raise
    return rid, op, args


@contextlib.contextmanager
def socket_address(path: str | Path) -> Iterator[str]:
    """An address for bind/connect, even when the path is longer than AF_UNIX allows (~107 bytes).

    A long path is reached through its folder's descriptor: /proc/self/fd/N/engine.sock.
    """
    path = Path(path)
    if len(os.fsencode(str(path))) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


Handler = Callable[[str, dict[str, Any]], dict[str, Any]]


class ControlServer:
    """Accepts clients on a Unix socket (mode 0600) and answers their requests through `handler`.

    `handler(op, args)` returns the reply's fields (`ok` and more) and may raise
    RequestError for a refusal; it runs on the client's own thread.
    """

    def __init__(self, path: str | Path, handler: Handler):
        self.path = Path(path)
        self.handler = handler
        self._sock: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._answering = 0  # requests between read and reply sent; close() lets them finish
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)

    def start(self) -> "ControlServer":
        self.path.unlink(missing_ok=True)  # a stale socket from a dead engine (we hold the run's lock)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with socket_address(self.path) as address:
            sock.bind(address)
        # nobody can connect before listen(): set the mode first, so there is no window at 0644
        os.chmod(self.path, 0o600)
        sock.listen(socket.SOMAXCONN)
        sock.settimeout(0.25)  # so the accept loop notices close()
        self._sock = sock
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                crowded = len(self._clients) >= MAX_CLIENTS
                if not crowded:
                    self._clients.add(conn)
            if crowded:
                self._send(conn, {"id": None, "ok": False, "error": f"too many clients (max {MAX_CLIENTS})"})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-client", daemon=True).start()

    @staticmethod
    def _send(conn: socket.socket, reply: dict[str, Any]) -> bool:
        try:
            data = json.dumps(reply, default=str, allow_nan=False)
        except (ValueError, TypeError, RecursionError) as e:
            # A reply JSON cannot carry (a NaN, a cycle): the client still gets one line, and its id
            # (a string, a number or null: parse_request saw to that).
            data = json.dumps({"id": reply.get("id"), "ok": False,
                               "error": f"internal error: the reply could not be encoded ({type(e).__name__})"})
        try:
            conn.sendall(data.encode() + b"\n")
            return True
        except OSError:
            return False

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            rid, op, args = parse_request(line)
        except RequestError as e:
            return {"id": getattr(e, "request_id", None), "ok": False, "error": str(e)}
        try:
            reply = self.handler(op, args)
        except RequestError as e:
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # a bug in one request must never take the engine down
            reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        return {"id": rid, **reply}

    def _respond(self, conn: socket.socket, line: bytes) -> bool:
        """Answer one request line; counted, so that close() lets a reply in flight reach its client."""
        with self._lock:
            self._answering += 1
        try:
            reply = self._too_large() if len(line) > MAX_REQUEST_BYTES else self._answer(line)
            return self._send(conn, reply)
        finally:
            with self._idle:
                self._answering -= 1
                self._idle.notify_all()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        skipping = False  # inside an oversized line: drop bytes up to its newline
        try:
            while not self._closed.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if len(buf) > MAX_REQUEST_BYTES:
                            if not skipping:
                                skipping = True
                                if not self._send(conn, self._too_large()):
                                    return
                            buf.clear()
                        break
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if skipping:  # the tail of an oversized line, already answered
                        skipping = False
                        continue
                    if len(line) <= MAX_REQUEST_BYTES and not line.strip():
                        continue
                    if not self._respond(conn, line):
                        return
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()

    @staticmethod
    def _too_large() -> dict[str, Any]:
        return {"id": None, "ok": False, "error": f"request too large (over {MAX_REQUEST_BYTES} bytes); skipped"}

    def close(self) -> None:
        """Stop accepting, hang up on every client and remove the socket file."""
        self._closed.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        with self._idle:  # a reply just answered (the `stop` one above all) still reaches its client
            self._idle.wait_for(lambda: self._answering == 0, timeout=5)
            clients = list(self._clients)
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.path.unlink(missing_ok=True)

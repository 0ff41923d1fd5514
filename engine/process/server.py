"""The engine's control socket: newline-delimited JSON requests over a Unix socket (mode 0600).

The requests, their checks and the reply shape are in ops.py: a malformed request (bad
JSON, nested too deeply, an unknown op, a wrong type) or a line over MAX_REQUEST_BYTES gets
an error reply and changes nothing. Each client has its own thread; the handler may block
(the training thread answers model requests between steps) without holding up other
clients. This module imports no torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from workbench.engine.process.ops import RequestError, parse_request

MAX_REQUEST_BYTES = 1 << 20  # one request line; longer ones are refused and skipped
MAX_CLIENTS = 64

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


def listen_private(path: Path, backlog: int) -> socket.socket:
    """A listening Unix socket at `path` that only this user can connect to (mode 0600), with a
    short accept timeout so that an accept loop notices when it is closed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket_address(path) as address:
        sock.bind(address)
    os.chmod(path, 0o600)  # nobody can connect before listen(): there is no window at 0644
    sock.listen(backlog)
    sock.settimeout(0.25)
    return sock


def clients(sock: socket.socket, closed: threading.Event) -> Iterator[socket.socket]:
    """Each client of a listen_private socket (in blocking mode) until `closed` is set or the
    socket is closed; the accept timeout is what lets the loop notice."""
    while not closed.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        conn.settimeout(None)
        yield conn


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

    def start(self) -> ControlServer:
        self.path.unlink(missing_ok=True)  # a stale socket from a dead engine (we hold the run's lock)
        self._sock = listen_private(self.path, socket.SOMAXCONN)
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        for conn in clients(self._sock, self._closed):
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

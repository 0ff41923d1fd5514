"""The warm inference service: a checkpoint loaded once, answering many chat requests as streams of text.

    service = ChatService.open("runs/chat")               # loads the latest (or a named) checkpoint
    gen = service.chat(messages, max_tokens=64, temperature=0.8, top_p=0.95, stop=["\\n\\n"], seed=1)
    for piece in gen: print(piece, end="")                 # text pieces, never a split character
    gen.finish, gen.text, gen.tokens, gen.prompt_tokens, gen.dropped, gen.first_token_s

The prompt is rendered by the one chat template (workbench.engine.chat): prompt + max_tokens must
fit the model's context, so the oldest user/assistant turns are dropped until it does (`dropped`
counts the messages left out). A reply ends at the model's <|end|> or a `stop` string
(finish "stop", neither included) or after max_tokens tokens (finish "length"). One request
generates at a time (a lock): others wait their turn.

The run's Unix socket, `serve.sock` (mode 0600; a training engine's is `engine.sock`), speaks JSON
lines: a request `{"id": 1, "op": "chat", "messages": [...], "max_tokens": 64, "temperature": 0.8,
"top_p": 1.0, "top_k": 0, "stop": [], "seed": null, "conversation": null}` is answered by
`{"id": 1, "ok": true, "piece": "..."}` lines as the reply is generated, then one
`{"id": 1, "ok": true, "done": true, "reply", "finish", "tokens", "prompt_tokens", "dropped",
"conversation", "checkpoint"}`; `{"op": "info"}` gets the model's name, context and whether it is
chat-tuned; a refused request gets `{"id", "ok": false, "error"}`. `chat_stream` below is the
client (no torch: the TUI uses it). Every socket conversation is kept in conversations.jsonl
under the id the client passes back as `conversation` (a new one when null).
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workbench.engine import conversations as convlog
from workbench.engine.chat import ChatError
from workbench.engine.errors import WorkbenchError
from workbench.engine.process.server import clients, listen_private, socket_address

SOCKET_NAME = "serve.sock"
MAX_REQUEST_BYTES = 1 << 20  # one request (a socket line or an HTTP body)
DEFAULT_MAX_TOKENS = 256
SMALL_MODEL_PARAMS = 30_000_000  # below this, one CPU thread decodes fastest


class RequestRefused(WorkbenchError):
    """A request that cannot be served as asked; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def socket_path(run: str | Path) -> Path:
    return Path(run) / SOCKET_NAME


def is_chat_tuned(cfg) -> bool:
    """A run trained on chat data: its dataset folder has chat.json (workbench.engine.data.dataset)."""
    return (Path(cfg.data.path) / "chat.json").is_file() if cfg.data.path else False


class Generation:
    """One reply as it is generated: iterate for text pieces; the totals are set once it ends."""

    def __init__(self, service: ChatService, prompt_ids: list[int], dropped: int, max_tokens: int,
                 temperature: float, top_k: int, top_p: float, stop: list[str], seed: int | None):
        self.service, self.prompt_ids, self.dropped = service, prompt_ids, dropped
        self.max_tokens, self.temperature, self.top_k, self.top_p = max_tokens, temperature, top_k, top_p
        self.stop, self.seed = [s for s in stop if s], seed
        self.prompt_tokens = len(prompt_ids)
        self.text, self.tokens, self.finish = "", 0, None
        self.first_token_s: float | None = None  # from the call to the first piece's token
        self.seconds = 0.0
        self._iter = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._iter

    def __next__(self) -> str:
        return next(self._iter)

    def close(self) -> None:
        """Stop generating (a client that went away); the lock is released."""
        self._iter.close()

    def result(self) -> Generation:
        for _ in self._iter:
            pass
        return self

    def _run(self) -> Iterator[str]:
        svc = self.service
        tok = svc.tokenizer
        t0 = time.perf_counter()
        with svc.lock:
            ids: list[int] = []
            sent = 0  # characters of the decoded reply already yielded
            finish = "length"
            hold = max((len(s) for s in self.stop), default=1) - 1
            tokens = svc.model.stream(self.prompt_ids, self.max_tokens, self.temperature, self.top_k,
                                      self.top_p, stop_ids=[svc.template.end_id], seed=self.seed)
            try:
                for token in self._steps(tokens):
                    ids.append(token)
                    self.tokens = len(ids)
                    if self.first_token_s is None:
                        self.first_token_s = time.perf_counter() - t0
                    text = tok.decode(ids)
                    cut = self._stop_at(text, sent - hold)
                    if cut is not None:
                        self.text, finish = text[:cut], "stop"
                        if cut > sent:
                            yield text[sent:cut]
                        break
                    # A trailing U+FFFD is a character whose bytes are not all out yet; a tail
                    # that could start a stop string waits until it cannot.
                    safe = len(text.rstrip("\ufffd"))
                    if self.stop:
                        safe = min(safe, self._stop_prefix_start(text))
                    if safe > sent:
                        self.text = text[:safe]
                        yield text[sent:safe]
                        sent = safe
                else:
                    text = tok.decode(ids)
                    self.text = text
                    if len(text) > sent:
                        yield text[sent:]
                    if len(ids) < self.max_tokens:
                        finish = "stop"  # the model wrote <|end|>
            finally:
                tokens.close()
                self.seconds = time.perf_counter() - t0
            self.finish = finish

    def _steps(self, tokens: Iterator[int]) -> Iterator[int]:
        """The model's tokens, each step under autocast (entered per step: it is thread state, and the
        consumer runs between steps)."""
        while True:
            with self.service.autocast():
                token = next(tokens, None)
            if token is None:
                return
            yield token

    def _stop_at(self, text: str, start: int) -> int | None:
        found = [i for s in self.stop if (i := text.find(s, max(0, start))) >= 0]
        return min(found) if found else None

    def _stop_prefix_start(self, text: str) -> int:
        """Where the longest tail of `text` that begins some stop string starts (len(text) if none)."""
        for n in range(min(len(text), max(len(s) for s in self.stop) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return len(text) - n
        return len(text)


class ChatService:
    """A run's checkpoint, loaded once (workbench.engine.checkpoint.open_run_model)."""

    def __init__(self, run: str | Path, loaded):
        from workbench.engine.chat import ChatTemplate

        self.run, self.loaded = Path(run), loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.template = ChatTemplate(loaded.tokenizer)
        self.seq_len = loaded.cfg.model.seq_len
        self.checkpoint = loaded.checkpoint.name
        self.chat_tuned = is_chat_tuned(loaded.cfg)
        self.model_id = self.run.resolve().name
        self.lock = threading.Lock()
        self.autocast = loaded.device.autocast

    @classmethod
    def open(cls, run: str | Path, checkpoint: str | None = None) -> ChatService:
        from workbench.engine.checkpoint import open_run_model

        loaded = open_run_model(run, checkpoint)
        if loaded.device.device.type == "cpu" and loaded.model.num_params() < SMALL_MODEL_PARAMS:
            import torch

            # Decoding a small model is per-op overhead: more threads only add synchronisation
            # (and on a busy machine, 2 threads ran 10x slower than 1 here).
            torch.set_num_threads(1)
        return cls(run, loaded)

    def warning(self) -> str | None:
        if self.chat_tuned:
            return None
        return (f"warning: {self.run} is a base model, not chat-tuned (its data has no chat.json): "
                "replies continue text rather than answer; fine-tune it on chat data first")

    def check_max_tokens(self, max_tokens: int | None) -> int:
        """The reply's token budget: prompt + max_tokens must fit the context (RequestRefused if it cannot)."""
        if max_tokens is None:
            return min(DEFAULT_MAX_TOKENS, self.seq_len // 2)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestRefused(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens",
                                 "invalid_value")
        if max_tokens > self.seq_len - 4:  # <|bos|> <|user|> x <|end|> <|assistant|> leave seq_len - 4 at best
            raise RequestRefused(f"max_tokens is too large: {max_tokens}. This model's context is {self.seq_len} "
                                 f"tokens, so at most {self.seq_len - 4} can be generated", "max_tokens",
                                 "invalid_value")
        return max_tokens

    def chat(self, messages, *, max_tokens: int | None = None, temperature: float = 0.8, top_p: float = 1.0,
             top_k: int = 0, stop: list[str] | None = None, seed: int | None = None) -> Generation:
        """The next assistant reply to `messages` (ending with a user turn), as a Generation to iterate.

        RequestRefused for a malformed conversation or settings; nothing is generated until iterated."""
        max_tokens = self.check_max_tokens(max_tokens)
        if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
            raise RequestRefused(f"temperature must be a number >= 0, got {temperature!r}", "temperature")
        if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
            raise RequestRefused(f"top_p must be in (0, 1], got {top_p!r}", "top_p")
        try:
            prompt = self.template.render_prompt(messages, max_tokens=self.seq_len - max_tokens)
        except ChatError as e:
            code = "context_length_exceeded" if e.reason == "too_long" else "invalid_messages"
            raise RequestRefused(f"messages: {e}", "messages", code) from None
        return Generation(self, prompt.ids, prompt.dropped, max_tokens, float(temperature), int(top_k),
                          float(top_p), list(stop or []), seed)

    def settings(self, gen: Generation) -> dict:
        return {"temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k,
                "max_tokens": gen.max_tokens, "stop": gen.stop, "seed": gen.seed}

    def record(self, conv_id: str, messages: list[dict], gen: Generation, source: str) -> None:
        """Keep the conversation, the new reply last, in the run's conversations.jsonl."""
        convlog.record_conversation(self.run, conv_id, [*messages, {"role": "assistant", "content": gen.text}],
                                    source=source, checkpoint=self.checkpoint, settings=self.settings(gen),
                                    finish=gen.finish, dropped=gen.dropped)

    def info(self) -> dict:
        return {"model": self.model_id, "run": str(self.run), "checkpoint": self.checkpoint,
                "context": self.seq_len, "chat_tuned": self.chat_tuned}


# ---- the run's socket ------------------------------------------------------------------------------

_CHAT_ARGS = {  # name -> (check, what it must be)
    "messages": (lambda v: isinstance(v, list), "a list of messages"),
    "max_tokens": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or null"),
    "temperature": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "top_p": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "stop": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings"),
    "seed": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or null"),
    "conversation": (lambda v: v is None or isinstance(v, str), "a string or null"),
}
_CHAT_DEFAULTS = {"max_tokens": None, "temperature": 0.8, "top_p": 1.0, "top_k": 0, "stop": [], "seed": None,
                  "conversation": None}


class ServeSocket:
    """`serve.sock` in the run folder: each client on its own thread, requests answered in order."""

    def __init__(self, service: ChatService, path: str | Path | None = None):
        self.service = service
        self.path = Path(path) if path else socket_path(service.run)
        self._sock: socket.socket | None = None
        self._closed = threading.Event()

    def start(self) -> ServeSocket:
        if self.path.exists():
            if _answers(self.path):
                raise WorkbenchError(f"{self.path} is already being served (another `workbench serve` runs)")
            self.path.unlink()  # a stale socket from a service that died
        self._sock = listen_private(self.path, 16)
        threading.Thread(target=self._accept_loop, name="serve-accept", daemon=True).start()
        return self

    def _accept_loop(self) -> None:
        for conn in clients(self._sock, self._closed):
            threading.Thread(target=self._serve, args=(conn,), name="serve-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            try:
                while not self._closed.is_set():
                    line = f.readline(MAX_REQUEST_BYTES + 1)
                    if not line:
                        return
                    if len(line) > MAX_REQUEST_BYTES and not line.endswith(b"\n"):
                        _send(conn, {"id": None, "ok": False, "error": f"request too large (over {MAX_REQUEST_BYTES}"
                                                                        " bytes)"})
                        return
                    if line.strip() and not self._answer(conn, line):
                        return
            except OSError:
                return

    def _answer(self, conn: socket.socket, line: bytes) -> bool:
        rid = None
        try:
            try:
                request = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise RequestRefused(f"malformed JSON: {e}") from None
            if not isinstance(request, dict):
                raise RequestRefused("a request must be a JSON object with an op")
            rid = request.get("id") if isinstance(request.get("id"), str | int | float) else None
            op = request.pop("op", None)
            request.pop("id", None)
            if op == "info":
                return _send(conn, {"id": rid, "ok": True, **self.service.info()})
            if op != "chat":
                raise RequestRefused(f"unknown op {op!r} (known: chat, info)")
            args = dict(_CHAT_DEFAULTS)
            for name, value in request.items():
                if name not in _CHAT_ARGS:
                    raise RequestRefused(f"chat: unexpected argument {name!r}")
                check, expected = _CHAT_ARGS[name]
                if not check(value):
                    raise RequestRefused(f"chat: {name} must be {expected}, got {value!r:.80}")
                args[name] = value
            conv_id = args.pop("conversation") or convlog.new_id()
            messages = args.pop("messages")
            gen = self.service.chat(messages, **args)
        except RequestRefused as e:
            return _send(conn, {"id": rid, "ok": False, "error": str(e)})
        try:
            for piece in gen:
                if not _send(conn, {"id": rid, "ok": True, "piece": piece}):
                    return False
        finally:
            gen.close()
        if gen.finish is None:
            return False
        self.service.record(conv_id, messages, gen, "socket")
        return _send(conn, {"id": rid, "ok": True, "done": True, "reply": gen.text, "finish": gen.finish,
                            "tokens": gen.tokens, "prompt_tokens": gen.prompt_tokens, "dropped": gen.dropped,
                            "conversation": conv_id, "checkpoint": self.service.checkpoint})

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            self._sock.close()
        self.path.unlink(missing_ok=True)


def _send(conn: socket.socket, reply: dict) -> bool:
    try:
        conn.sendall(json.dumps(reply, ensure_ascii=False).encode() + b"\n")
        return True
    except OSError:
        return False


def _answers(path: Path) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, \
            socket_address(path) as address:
        s.settimeout(1.0)
        s.connect(address)
        return True
    return False


# ---- the client (no torch) --------------------------------------------------------------------------

class ServiceNotRunning(WorkbenchError):
    """Nothing serves this run's socket (start `workbench serve RUN`)."""


def chat_stream(run: str | Path, messages: list[dict], *, timeout: float = 120.0, **settings: Any) -> Iterator[dict]:
    """Ask the run's service for a reply: yields {"piece": text} dicts, then the final {"done": True, ...} one.

    settings: max_tokens, temperature, top_p, top_k, stop, seed, conversation (the id of a
    conversation to continue in conversations.jsonl). ServiceNotRunning / WorkbenchError on failure."""
    return _request(run, {"op": "chat", "messages": messages, **settings}, timeout)


def service_info(run: str | Path, timeout: float = 5.0) -> dict:
    return next(_request(run, {"op": "info"}, timeout))


def _request(run: str | Path, request: dict, timeout: float) -> Iterator[dict]:
    path = socket_path(run)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with socket_address(path) as address:
            sock.connect(address)
    except OSError:
        sock.close()
        raise ServiceNotRunning(f"no service on {path} (start one with `workbench serve {run}`)") from None
    return _replies(sock, request)


def _replies(sock: socket.socket, request: dict) -> Iterator[dict]:
    with sock, sock.makefile("rb") as f:
        sock.sendall(json.dumps({"id": 1, **request}).encode() + b"\n")
        while True:
            line = f.readline()
            if not line:
                raise WorkbenchError("the service closed the connection mid-reply")
            reply = json.loads(line)
            if not reply.get("ok"):
                raise WorkbenchError(reply.get("error", "the service refused the request"))
            reply.pop("id", None)
            reply.pop("ok", None)
            yield reply
            if "piece" not in reply:
                return

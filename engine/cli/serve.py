"""`workbench serve RUN [--http HOST:PORT] [--checkpoint NAME]`: a run's checkpoint as a warm chat service.

Loads the checkpoint once and serves the run's socket, RUN/serve.sock (mode 0600; JSON lines, see
workbench.engine.serve), until interrupted. With --http, also an OpenAI-compatible API on HOST:PORT
(127.0.0.1 by default when only a port is given):

    GET  /v1/models                 {"object": "list", "data": [{"id": RUN_NAME, "object": "model", ...}]}
    POST /v1/chat/completions       model, messages, stream, temperature, top_p, max_tokens
                                    (or max_completion_tokens), stop, seed, n (1 only), stream_options
    stream false: a `chat.completion` object with `usage`;
    stream true:  server-sent events `data: {chat.completion.chunk}` lines, the first with the
                  assistant role, the last with finish_reason ("stop" | "length"), then `data: [DONE]`.

A bad request gets `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON, wrong
field types or a conversation/max_tokens that does not fit the context, 404 for an unknown path
or model, 405 for a wrong method, 411 without Content-Length, 413 over 1 MiB. One request generates
at a time; others wait. Every conversation is kept in RUN/conversations.jsonl.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from workbench.engine import conversations as convlog
from workbench.engine.errors import ConfigError
from workbench.engine.serve import MAX_REQUEST_BYTES, RequestRefused


def add_arguments(parser) -> None:
    parser.add_argument("run", help="run folder (runs/NAME)")
    parser.add_argument("--http", metavar="HOST:PORT",
                        help="also serve the OpenAI-compatible API there (PORT alone: 127.0.0.1:PORT)")
    parser.add_argument("--checkpoint", metavar="NAME", help="checkpoint name (default: the latest)")


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--http must be HOST:PORT or PORT, got {text!r}")
    return host, int(port)


def run(args) -> int:
    address = parse_address(args.http) if args.http else None
    from workbench.engine.serve import ChatService, ServeSocket

    service = ChatService.open(args.run, args.checkpoint)
    if (warning := service.warning()) is not None:
        print(warning, file=sys.stderr, flush=True)
    sock = ServeSocket(service).start()
    httpd = None
    try:
        if address is not None:
            try:
                httpd = make_http_server(service, address)
            except OSError as e:
                raise ConfigError(f"cannot listen on {args.http}: {e.strerror or e}") from None
            threading.Thread(target=httpd.serve_forever, name="serve-http", daemon=True).start()
        where = f" and http://{address[0]}:{httpd.server_address[1]}/v1" if httpd else ""
        print(f"serving {service.model_id} ({service.checkpoint}, context {service.seq_len}) on {sock.path}{where}",
              flush=True)
        # Until Ctrl-C or SIGTERM (SIGINT is ignored in a background job: TERM is the way to stop one).
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        sock.close()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# ---- the OpenAI-compatible API ------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Known fields: name -> (check, what it must be). Unknown fields are ignored, as OpenAI clients send extras.
FIELDS = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "messages": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty array of messages"),
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "temperature": (lambda v: _number(v) and 0 <= v <= 2, "a number between 0 and 2"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "max_tokens": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "max_completion_tokens": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "stop": (lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) <= 4
                                              and all(isinstance(s, str) for s in v)), "a string or up to 4 strings"),
    "seed": (lambda v: _integer(v), "an integer"),
    "n": (lambda v: v == 1 and _integer(v), "1 (one choice per request)"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
    "user": (lambda v: isinstance(v, str), "a string"),
}


def check_completion_request(body, model_id: str) -> dict:
    """The request's settings, or ApiError naming the field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, (check, expected) in FIELDS.items():
        if body.get(name) is not None and not check(body[name]):
            raise ApiError(400, f"{name} must be {expected}, got {json.dumps(body[name])[:80]}", name, "invalid_type")
    if "messages" not in body or body["messages"] is None:
        raise ApiError(400, "messages is required", "messages", "missing_required_parameter")
    if body.get("model") not in (None, model_id):
        raise ApiError(404, f"The model `{body['model']}` does not exist (this server serves `{model_id}`)", "model",
                       "model_not_found")
    stop = body.get("stop")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    def given(name, default):  # a field left out and a field sent as null mean the same
        return default if body.get(name) is None else body[name]

    return {"messages": body["messages"], "stream": bool(body.get("stream")),
            "temperature": given("temperature", 1.0), "top_p": given("top_p", 1.0),
            "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
            "stop": [stop] if isinstance(stop, str) else list(stop or []),
            "seed": body.get("seed"), "include_usage": include_usage}


def make_http_server(service, address: tuple[str, int]) -> ThreadingHTTPServer:
    handler = type("Handler", (ApiHandler,), {"service": service})
    server = ThreadingHTTPServer(address, handler)
    server.daemon_threads = True
    return server


class ApiHandler(BaseHTTPRequestHandler):
    service = None  # the ChatService, set by make_http_server
    server_version = "workbench"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # one short line per request on stderr
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    # -- plumbing --
    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        self._json(e.status, e.body())

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required")
        if not length.isdigit():
            self.close_connection = True
            raise ApiError(400, "Content-Length must be a number")
        if int(length) > MAX_REQUEST_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise ApiError(413, f"request body too large ({length} bytes; the limit is {MAX_REQUEST_BYTES})",
                           code="request_too_large")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    # -- routes --
    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        svc = self.service
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [self._model_card()]})
        elif path == f"/v1/models/{svc.model_id}":
            self._json(200, self._model_card())
        elif path == "/v1/chat/completions":
            self._error(ApiError(405, "use POST for /v1/chat/completions", code="method_not_allowed"))
        else:
            self._error(ApiError(404, f"no route {self.path}", code="not_found"))

    def _model_card(self) -> dict:
        svc = self.service
        return {"id": svc.model_id, "object": "model", "created": int(svc.loaded.checkpoint.stat().st_mtime),
                "owned_by": "workbench", "max_model_len": svc.seq_len, "checkpoint": svc.checkpoint}

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            self._error(ApiError(405 if path == "/v1/models" else 404, f"no route POST {self.path}",
                                 code="not_found"))
            return
        try:
            req = check_completion_request(self._read_body(), self.service.model_id)
            try:
                gen = self.service.chat(req["messages"], max_tokens=req["max_tokens"], temperature=req["temperature"],
                                        top_p=req["top_p"], stop=req["stop"], seed=req["seed"])
            except RequestRefused as e:
                raise ApiError(400, str(e), e.param, e.code) from None
        except ApiError as e:
            self._error(e)
            return
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req["stream"]:
            self._stream(gen, rid, created, req["include_usage"])
        else:
            gen.result()
            self._json(200, {"id": rid, "object": "chat.completion", "created": created,
                             "model": self.service.model_id, "system_fingerprint": self.service.checkpoint,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                                          "logprobs": None, "finish_reason": gen.finish}],
                             "usage": _usage(gen)})
        if gen.finish is not None:
            self.service.record(convlog.new_id(), req["messages"], gen, "http")

    def do_PUT(self):
        self._error(ApiError(405, f"{self.command} is not allowed here", code="method_not_allowed"))

    do_DELETE = do_PATCH = do_PUT

    def _stream(self, gen, rid: str, created: int, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        model = self.service.model_id

        def event(delta: dict, finish=None, usage=None, choices=True) -> None:
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "system_fingerprint": self.service.checkpoint,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                     if choices else []}
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")
            self.wfile.flush()

        try:
            event({"role": "assistant", "content": ""})
            for piece in gen:
                event({"content": piece})
            event({}, gen.finish)
            if include_usage:
                event({}, usage=_usage(gen), choices=False)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # the client went away: stop generating
            pass
        finally:
            gen.close()


def _usage(gen) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.tokens,
            "total_tokens": gen.prompt_tokens + gen.tokens}

"""The warm chat service: streaming replies in-process, the run's socket, and the OpenAI-compatible HTTP API.

The run is the tiny base model of conftest's `trained_run` (not chat-tuned: its replies are noise,
which is fine, the plumbing is what is tested, and it must say it is a base model).
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import stat
import threading
import urllib.error
import urllib.request

import pytest
from engine_helpers import wait_for, workbench_popen

from workbench.engine import conversations as convlog

HI = [{"role": "user", "content": "Hello!"}]  # a few tokens: the tiny model has 32 of context


@pytest.fixture
def run(trained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


@pytest.fixture
def service(run, torch_single_thread):
    from workbench.engine.serve import ChatService

    return ChatService.open(run)


# ---- in-process -----------------------------------------------------------------------------------

def test_stream_pieces_make_the_reply_and_greedy_is_repeatable(service):
    gen = service.chat(HI, max_tokens=12, temperature=0)
    pieces = list(gen)
    assert "".join(pieces) == gen.text and gen.tokens <= 12
    assert gen.finish in ("stop", "length") and (gen.finish == "length") == (gen.tokens == 12)
    assert gen.prompt_tokens > 0 and gen.first_token_s is not None
    assert service.chat(HI, max_tokens=12, temperature=0).result().text == gen.text
    assert not service.chat_tuned and "base model" in service.warning()


def test_stop_string_ends_the_reply_and_is_left_out(service):
    full = service.chat(HI, max_tokens=20, temperature=0).result().text
    stop = full.strip()[:1] or full[:1]  # a character the greedy reply contains
    gen = service.chat(HI, max_tokens=20, temperature=0, stop=[stop]).result()
    assert gen.finish == "stop" and stop not in gen.text and full.startswith(gen.text)


class _FakeModel:
    """Plays back fixed token ids, as a model would sample them."""

    def __init__(self, ids):
        self.ids = ids

    def stream(self, prompt, max_tokens, *args, **kw):
        yield from self.ids[:max_tokens]


def test_multibyte_characters_are_never_split(service):
    text = "é ✓日"
    ids = service.tokenizer.encode(text)
    assert len(text) < len(ids) < 16  # byte fallback: some characters take several tokens
    service.model = _FakeModel(ids)
    gen = service.chat(HI, max_tokens=16, temperature=0)
    pieces = list(gen)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert gen.finish == "stop"  # the ids ran out before max_tokens, as at <|end|>


def test_oldest_turns_are_dropped_to_fit_and_bad_settings_are_refused(service):
    from workbench.engine.serve import RequestRefused

    long = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        long += [{"role": "user", "content": f"question {i} about str"}, {"role": "assistant", "content": "ok"}]
    long.append({"role": "user", "content": "and now?"})
    gen = service.chat(long, max_tokens=8, temperature=0)
    assert gen.dropped >= 2 and gen.dropped % 2 == 0
    assert len(gen.prompt_ids) + 8 <= service.seq_len
    for bad, param in [({"max_tokens": service.seq_len}, "max_tokens"), ({"temperature": -1}, "temperature"),
                       ({"top_p": 0}, "top_p")]:
        with pytest.raises(RequestRefused) as e:
            service.chat(HI, **bad)
        assert e.value.param == param
    with pytest.raises(RequestRefused, match="messages"):
        service.chat([{"role": "assistant", "content": "hi"}])


def test_decode_step_equals_the_full_forward(service):
    import torch

    from workbench.engine.model import KVCache

    model = service.model
    ids = [service.tokenizer.bos_id, *service.tokenizer.encode("The os module")][:12]
    cache = KVCache(model.cfg.n_layer, model.cfg.seq_len)
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
        model.hidden(torch.tensor([ids[:3]]), cache)
        steps = [model._decode_step(t, cache)[0] for t in ids[3:]]
    torch.testing.assert_close(torch.stack(steps), full[3:], rtol=1e-5, atol=1e-5)  # logits after each token


# ---- the socket -----------------------------------------------------------------------------------

def test_socket_streams_replies_and_keeps_conversations(service, run):
    from workbench.engine.serve import ServeSocket, ServiceNotRunning, chat_stream, service_info

    with pytest.raises(ServiceNotRunning):
        service_info(run)
    server = ServeSocket(service).start()
    try:
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600 and server.path.name == "serve.sock"
        assert service_info(run)["context"] == service.seq_len
        replies = list(chat_stream(run, HI, max_tokens=6, temperature=0))
        done = replies[-1]
        assert done["done"] and done["finish"] in ("stop", "length")
        assert "".join(r["piece"] for r in replies[:-1]) == done["reply"]
        # The same conversation continued under its id: one more line, same id, four messages.
        follow = [*HI, {"role": "assistant", "content": done["reply"]}, {"role": "user", "content": "More?"}]
        again = list(chat_stream(run, follow, max_tokens=4, conversation=done["conversation"]))[-1]
        assert again["conversation"] == done["conversation"]
        convs = convlog.conversations(convlog.path_of(run))
        assert len(convs) == 1 and len(convs[0]["messages"]) == 4 and convs[0]["source"] == "socket"
        # Two clients at once: both answered (one generates at a time).
        results = []
        threads = [threading.Thread(target=lambda: results.append(list(chat_stream(run, HI, max_tokens=5))[-1]))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 2 and all(r["done"] for r in results)
        with pytest.raises(Exception, match="unexpected argument"):
            list(chat_stream(run, HI, bogus=1))
        with pytest.raises(Exception, match="max_tokens"):
            list(chat_stream(run, HI, max_tokens=10_000))
    finally:
        server.close()
    assert not server.path.exists()


# ---- HTTP, with the real OpenAI client --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server(run):
    port = _free_port()
    proc = workbench_popen("serve", run, "--http", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {proc.stderr.read()}")
        try:
            return urllib.request.urlopen(url + "/v1/models", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(up, timeout=90, every=0.2, what="workbench serve")
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0
    assert "base model" in proc.stderr.read()  # the base-model warning line
    assert not (run / "serve.sock").exists()


def test_openai_client_streaming_and_not(http_server, run):
    import openai

    url, _ = http_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    models = client.models.list().data
    assert [m.id for m in models] == ["run"]
    done = client.chat.completions.create(model="run", messages=HI, max_tokens=10, temperature=0, seed=1)
    choice = done.choices[0]
    assert done.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert done.usage.completion_tokens <= 10 and done.usage.total_tokens == done.usage.prompt_tokens + \
        done.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="run", messages=HI, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: streamed or not, the same reply
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=HI)
    sources = [c["source"] for c in convlog.conversations(convlog.path_of(run))]
    assert sources == ["http", "http"]


def _post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_errors_are_openai_error_bodies(http_server):
    url, _ = http_server
    cases = [
        (b"not json", 400, None),
        (json.dumps({"messages": HI, "max_tokens": 10_000}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": HI, "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
        (json.dumps({"model": "run"}).encode(), 400, "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "x " * 5000}]}).encode(), 400, "messages"),
        (json.dumps([1, 2]).encode(), 400, None),
    ]
    for body, status, param in cases:
        got, reply = _post(url, body)
        assert got == status, (body[:60], reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
        assert reply["error"]["param"] == param
    # Too large: refused on its Content-Length, before the body is read.
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    try:
        urllib.request.urlopen(url + "/v1/nothing", timeout=10)
        raise AssertionError("expected a 404")
    except urllib.error.HTTPError as e:
        assert e.code == 404 and "error" in json.loads(e.read())
    # Still serving after all that.
    assert _post(url, json.dumps({"messages": HI, "max_tokens": 3}).encode())[0] == 200

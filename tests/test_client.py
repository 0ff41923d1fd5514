"""workbench.engine.process.client (the library the TUI uses) and the control protocol, without torch.

A run's engine is stood in for by a small process that holds the run's real
EngineLock (no torch, starts in milliseconds), so every lock/pid/state combination
can be made on purpose; the real engine's paths are in test_engine_process.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from engine_helpers import cli_env, workbench
from event_fixtures import complete, fields

from workbench.engine.events import EventWriter, read_events
from workbench.engine.process import client
from workbench.engine.process.ops import RequestError, parse_request
from workbench.engine.process.server import MAX_REQUEST_BYTES, ControlServer

HOLDER = """
import sys, time
from workbench.engine.process.lock import EngineLock
from workbench.engine.rundir import RunDir
EngineLock(RunDir.at(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


class Holder:
    """A process holding the run's engine lock and pid file, as a live engine does."""

    def __init__(self, run: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], env=cli_env(),
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def holders():
    made = []
    yield lambda run: made.append(Holder(run)) or made[-1]
    for h in made:
        h.proc.kill()
        h.proc.wait(10)


def make_run(root: Path, name: str = "r", max_steps: int = 100) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text(f"[train]\nmax_steps = {max_steps}\n")
    return run


def emit(run: Path, kind: str, **given) -> None:
    """One event with `given` fields (the rest defaults: event_fixtures.fields)."""
    w = EventWriter(run / "events.jsonl")
    w.emit(kind, **fields(kind, **given))
    w.close()


def test_client_and_cli_views_import_no_torch():
    modules = ("workbench.engine.process.client, workbench.engine.process.server, workbench.engine.cli.attach, "
               "workbench.engine.cli.runs, workbench.engine.cli.control, workbench.engine.sysstats, "
               "workbench.engine.process.host, workbench.engine.process.spawn")
    code = f"import sys, {modules}; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "torch" not in out.stdout


def test_run_state_is_decided_by_the_lock_not_by_stale_files(tmp_path, holders):
    run = make_run(tmp_path)
    assert client.run_state(run) == "new"
    emit(run, "state", state="starting")
    emit(run, "state", state="running")
    assert client.run_state(run) == "crashed"  # says running, but nobody holds the lock

    holder = holders(run)
    assert client.engine_alive(run) and client.engine_pid(run) == holder.proc.pid
    assert client.run_state(run) == "running"
    emit(run, "state", state="paused")
    assert client.run_state(run) == "paused"

    holder.kill()  # kill -9: the kernel drops the flock; engine.pid stays behind
    assert (run / "engine.pid").read_text().strip() == str(holder.proc.pid)
    assert client.run_state(run) == "crashed"
    (run / "engine.pid").write_text(f"{os.getpid()}\n")  # a live but unrelated pid changes nothing
    assert client.run_state(run) == "crashed"

    emit(run, "state", state="finished")
    assert client.run_state(run) == "finished"
    holders(run)  # an engine resuming the finished run, not yet past its imports
    assert client.run_state(run) == "starting"
    time.sleep(0.02)
    emit(run, "state", state="stopped")  # written by that engine as it exits
    assert client.run_state(run) == "stopped"


def test_a_lock_held_for_a_dead_pid_is_not_alive(tmp_path, holders):
    run = make_run(tmp_path)
    emit(run, "state", state="running")
    holders(run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "engine.pid").write_text(f"{dead.pid}\n")  # e.g. the lock inherited by a child of a dead engine
    assert not client.engine_alive(run) and client.run_state(run) == "crashed"


def test_zombies_count_as_dead(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{child.pid}/stat").read_text().split(")")[1].split()[0] != "Z":
        time.sleep(0.01)
    assert not client.pid_alive(child.pid)  # exited, not yet reaped
    child.wait()
    assert client.pid_alive(os.getpid())


def test_follow_replays_history_then_live_events_and_waits_out_a_torn_line(tmp_path, holders):
    run = make_run(tmp_path)
    for i in range(3):
        emit(run, "step", step=i + 1, loss=1.0)
    holder = holders(run)
    got = []
    reader = threading.Thread(target=lambda: got.extend(client.follow(run, poll=0.02, until_done=True)))
    reader.start()
    deadline = time.time() + 10
    while len(got) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert [e["step"] for e in got] == [1, 2, 3]  # the history

    line = json.dumps(complete({"type": "step", "step": 4, "loss": 0.5}), separators=(",", ":")).encode()
    with open(run / "events.jsonl", "ab") as f:  # the engine half way through writing a line
        f.write(line[:30])
        f.flush()
        time.sleep(0.15)
        assert len(got) == 3  # not a half event, not an error
        f.write(line[30:] + b"\n")
        f.write(b'{"v":1,"t":1.0,"type":"st\x00\xffcorrupt\n')  # garbage between good lines: skipped
        f.write(json.dumps(complete({"type": "step", "step": 5, "loss": 0.4})).encode() + b"\n")
    while len(got) < 5 and time.time() < deadline:
        time.sleep(0.01)
    assert [e["step"] for e in got] == [1, 2, 3, 4, 5]
    emit(run, "state", state="finished")
    holder.kill()  # the engine goes: following ends, with everything it wrote
    reader.join(10)
    assert not reader.is_alive() and got[-1] == {**got[-1], "type": "state", "state": "finished"}



def test_a_new_writer_after_a_torn_line_loses_no_event(tmp_path):
    """An engine killed mid-line, then `train --resume`: its first event must not be glued to the torn one."""
    path = tmp_path / "events.jsonl"
    EventWriter(path).emit("step", **fields("step", step=1, loss=1.0))
    with open(path, "ab") as f:
        f.write(b'{"v":1,"t":2.0,"type":"step","st')
    w = EventWriter(path)
    w.emit("state", state="starting")
    w.close()
    events, _ = read_events(path)
    assert [e["type"] for e in events] == ["step", "state"]

def test_follow_from_an_offset_and_with_a_stop(tmp_path):
    run = make_run(tmp_path)
    emit(run, "log", message="old")
    offset = (run / "events.jsonl").stat().st_size
    emit(run, "log", message="new")
    seen = []
    for event in client.follow(run, offset, poll=0.01, stop=lambda: len(seen) >= 1):
        seen.append(event)
    assert [e["message"] for e in seen] == ["new"]


def test_tail_events_reads_backwards_across_blocks(tmp_path):
    path = tmp_path / "events.jsonl"
    w = EventWriter(path)
    w.emit("state", **fields("state", state="running"))
    w.emit("log", **fields("log", message="device: cpu (2 threads), float32"))
    for i in range(1, 400):
        w.emit("step", **fields("step", step=i, loss=10 - i / 100))
        if i % 50 == 0:
            w.emit("eval", **fields("eval", step=i, val_loss=5 - i / 1000))
        w.emit("log", **fields("log", message="x" * (i % 37)))  # lines of many lengths
    w.close()
    with open(path, "ab") as f:
        f.write(b'{"v":1,"t":2.0,"type":"step","step":400,"lo')  # torn last line
    found = client.tail_events(path, {"state": client.of_type("state"), "step": client.of_type("step"),
                                      "eval": client.of_type("eval"), "device": b'"message":"device: '}, block=97)
    assert found["state"]["state"] == "running" and found["step"]["step"] == 399
    assert found["eval"]["step"] == 350 and found["device"]["message"].startswith("device: cpu")
    assert client.tail_events(tmp_path / "missing.jsonl", {"state": client.of_type("state")}) == {}

    # Asked again (the TUI does, every second): only what was appended is read, torn lines included.
    wanted = {"state": client.of_type("state"), "step": client.of_type("step")}
    assert client.tail_events(path, wanted)["step"]["step"] == 399
    with open(path, "ab") as f:
        f.write(b'\x00\n{"v":1,"t":3.0,"type":"state","sta')  # the torn step ends as garbage...
    assert client.tail_events(path, wanted)["state"]["state"] == "running"
    with open(path, "ab") as f:
        f.write(b'te":"paused"}\n')  # ...and the half-written state is read once it is whole
    assert client.tail_events(path, wanted) == {"state": {"v": 2, "t": 3.0, "type": "state", "state": "paused"},
                                                "step": found["step"]}  # a v1 line, read as v2
    path.unlink()
    EventWriter(path).emit("state", state="finished")  # a new file at the same path: no stale answer
    assert client.tail_events(path, wanted) == {"state": {**client.tail_events(path, wanted)["state"],
                                                          "state": "finished"}}


def test_list_runs_and_ls(tmp_path, holders):
    root = tmp_path / "runs"
    done = make_run(root, "done", max_steps=50)
    emit(done, "state", state="starting")
    emit(done, "log", message="device: cpu (2 threads), float32, peak 166GFLOP/s")
    emit(done, "state", state="running")
    emit(done, "step", step=50, max_steps=50, loss=2.5, tokens_per_s=12345.6)
    emit(done, "eval", step=50, val_loss=2.75, val_ppl=15.6, val_bpb=2.1)
    emit(done, "state", state="finished")
    live = make_run(root, "live", max_steps=1000)
    emit(live, "state", state="running")
    emit(live, "step", step=7, max_steps=1000, loss=5.0, tokens_per_s=900.0)
    holders(live)
    (root / "not-a-run").mkdir()

    runs = {r["name"]: r for r in client.list_runs(root)}
    assert set(runs) == {"done", "live"}
    assert runs["done"] == {**runs["done"], "state": "finished", "step": 50, "max_steps": 50, "train_loss": 2.5,
                            "val_loss": 2.75, "tokens_per_s": 12345.6, "device": "cpu (2 threads)"}
    assert runs["live"]["state"] == "running" and runs["live"]["val_loss"] is None
    assert 0 <= runs["live"]["age_s"] < 60
    assert client.list_runs(tmp_path / "nowhere") == []

    out = workbench("ls", root)
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["NAME", "STATE", "STEP", "TRAIN", "VAL", "TOK/S", "DEVICE", "AGE"]
    assert any(r.split()[:6] == ["done", "finished", "50/50", "2.5000", "2.7500", "12.3k"] for r in rows)
    assert any(r.split()[:3] == ["live", "running", "7/1000"] for r in rows)
    missing = workbench("ls", tmp_path / "nowhere")
    assert missing.returncode == 2 and missing.stderr == f"error: no runs folder at {tmp_path / 'nowhere'}\n"


def test_ls_shows_the_device_of_the_last_running_state_not_log_text(tmp_path):
    root = tmp_path / "runs"
    run = make_run(root, "moved", max_steps=20)
    emit(run, "state", state="running", device="cpu (4 threads)", dtype="float32", kernels="torch")
    emit(run, "step", step=10, max_steps=20)
    emit(run, "state", state="stopped")
    emit(run, "log", message="device: a log line is only text, never read")  # resumed on a GPU:
    emit(run, "state", state="running", device="NVIDIA H100 80GB HBM3", dtype="bfloat16", kernels="cupy")
    emit(run, "step", step=20, max_steps=20)
    emit(run, "state", state="finished")
    assert client.run_summary(run)["device"] == "NVIDIA H100 80GB HBM3"
    out = workbench("ls", root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[:7] == ["moved", "finished", "20/20", "3.0000", "-", "1k", "NVIDIA"]
    assert "H100 80GB HBM3" in out.stdout
    never_ran = make_run(root, "new")
    emit(never_ran, "state", state="starting")
    assert client.run_summary(never_ran)["device"] is None


def test_requests_without_an_engine_fail_in_one_clear_line(tmp_path):
    run = make_run(tmp_path)
    emit(run, "state", state="running")
    with pytest.raises(client.EngineNotRunning, match=r"no engine is running for .* \(state: crashed\)"):
        client.request(run, "status")
    with pytest.raises(client.EngineNotRunning, match="no run folder"):
        client.request(tmp_path / "nope", "pause")
    out = workbench("pause", run)
    assert out.returncode == 2 and out.stderr.startswith("error: no engine is running") and out.stderr.count("\n") == 1
    status = workbench("status", run)
    assert status.returncode == 0 and "crashed" in status.stdout and "no engine running" in status.stdout
    attach = workbench("attach", run)  # nothing live: history, then it ends by itself
    assert attach.returncode == 0 and "state: running" in attach.stdout and "crashed" in attach.stderr


# ---- the protocol, against a real server ----------------------------------------------------

@pytest.fixture
def server(tmp_path):
    calls = []

    def handler(op, args):
        calls.append((op, args))
        if op == "save":
            raise RequestError("no model here")
        if op == "eval":
            raise RuntimeError("boom")
        return {"ok": True, "op": op, "args": args}

    s = ControlServer(tmp_path / "engine.sock", handler).start()
    yield s, calls
    s.close()


def connect(path) -> tuple[socket.socket, object]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock, sock.makefile("rb")


def test_replies_echo_ids_and_errors_never_reach_the_handler(server):
    s, calls = server
    sock, replies = connect(s.path)

    def ask(obj) -> dict:
        sock.sendall((obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n")
        return json.loads(replies.readline())

    assert ask({"id": "a", "op": "status"}) == {"id": "a", "ok": True, "op": "status", "args": {}}
    assert ask({"id": 2, "op": "sample", "prompt": "hi", "top_k": 3}) == {
        "id": 2, "ok": True, "op": "sample",
        "args": {"prompt": "hi", "max_tokens": 64, "temperature": 0.8, "top_k": 3, "top_p": 1.0, "seed": None}}
    assert ask({"id": 3, "op": "save"}) == {"id": 3, "ok": False, "error": "no model here"}
    assert ask({"id": 4, "op": "eval"}) == {"id": 4, "ok": False, "error": "internal error: RuntimeError: boom"}
    n = len(calls)
    for bad in (b"{", b'"status"', b'{"id": 5}', b'{"id": 5, "op": "STATUS"}', b'{"id": 5, "op": null}',
                b'{"id": 5, "op": "sample", "temperature": -1}', b'{"id": 5, "op": "sample", "seed": 1.5}',
                b'{"id": 5, "op": "sample", "top_p": 0}', b'{"id": 5, "op": "sample", "max_tokens": true}',
                b'{"id": 5, "op": "set", "values": {"lr_scale": 1e9}}',
                b'{"id": 5, "op": "set", "values": {"eval.interval": -1}}',
                b'{"id": 5, "op": "set", "values": {"lr_scale": 0}}', b'{"id": 5, "op": "stop", "now": 1}'):
        reply = ask(bad)
        assert reply["ok"] is False and reply["error"], bad
    assert len(calls) == n  # none of them got through to the engine
    sock.sendall(b"\n\n")  # blank lines are ignored
    assert ask({"id": 6, "op": "set", "values": {"lr_scale": 2, "checkpoint.interval": 0}})["args"] == {
        "values": {"lr_scale": 2.0, "checkpoint.interval": 0}}
    sock.close()


def test_oversized_lines_are_refused_and_skipped(server):
    s, calls = server
    sock, replies = connect(s.path)
    # sent in pieces, as a slow or hostile client would
    payload = b'{"id": 1, "op": "sample", "prompt": "' + b"x" * (3 * MAX_REQUEST_BYTES) + b'"}\n'
    for i in range(0, len(payload), 100_000):
        sock.sendall(payload[i:i + 100_000])
    assert "too large" in json.loads(replies.readline())["error"]
    just_fits = b'{"id": 2, "op": "sample", "prompt": "' + b"y" * 20_000 + b'"}\n'
    sock.sendall(just_fits + b'{"id": 3, "op": "status"}\n')
    assert json.loads(replies.readline())["id"] == 2
    assert json.loads(replies.readline())["id"] == 3
    assert [op for op, _ in calls] == ["sample", "status"]
    sock.close()


DEEP = 100_000  # far past Python's recursion limit, and well under MAX_REQUEST_BYTES


def test_deeply_nested_requests_get_an_error_reply_and_the_connection_stays_usable(server, monkeypatch):
    s, calls = server
    crashes = []  # an exception escaping a client thread (a RecursionError there closed the connection)
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    sock, replies = connect(s.path)

    def ask(raw: bytes) -> dict:
        assert len(raw) < MAX_REQUEST_BYTES
        sock.sendall(raw + b"\n")
        line = replies.readline()
        assert line.endswith(b"\n") and line.count(b"\n") == 1, line[:200]
        return json.loads(line)

    deep = b"[" * DEEP + b"]" * DEEP
    assert ask(b'{"id": 1, "op": "sample", "prompt": ' + deep + b"}") == {
        "id": None, "ok": False, "error": "malformed JSON: nested too deeply"}
    assert ask(b'{"id": 1, "op": "set", "values": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}")["error"] == (
        "malformed JSON: nested too deeply")
    # Nested just under what json.loads accepts: parsed, then refused without repr or echo of the nesting.
    shallow = b"[" * 900 + b"]" * 900
    assert ask(b'{"id": 2, "op": "sample", "prompt": ' + shallow + b"}") == {
        "id": 2, "ok": False, "error": "sample: prompt must be a string of at most 20000 characters, got [...]"}
    assert ask(b'{"id": 3, "op": ' + shallow + b"}")["error"].startswith("unknown op [...] (known: status")
    assert "got [...]" in ask(b'{"id": 4, "op": "set", "values": {"lr_scale": ' + shallow + b"}}")["error"]
    # The reply echoes the id, so an id that JSON could not carry back is refused, not echoed.
    for bad_id in (shallow, b'{"a": 1}', b"NaN", b"Infinity"):
        reply = ask(b'{"id": ' + bad_id + b', "op": "status"}')
        assert reply["id"] is None and reply["error"].startswith("the id must be a string, a number or null")
    assert ask(b'{"id": 5, "op": "status"}') == {"id": 5, "ok": True, "op": "status", "args": {}}
    assert [op for op, _ in calls] == ["status"] and crashes == []
    sock.close()


def test_a_reply_that_cannot_be_encoded_still_answers(tmp_path):
    def handler(op, args):
        if op == "eval":
            return {"ok": True, "metrics": {"val_loss": float("nan")}}  # JSON has no NaN
        nested = []
        for _ in range(DEEP):
            nested = [nested]
        return {"ok": True, "deep": nested}

    s = ControlServer(tmp_path / "engine.sock", handler).start()
    try:
        sock, replies = connect(s.path)
        for rid, op in ((1, "eval"), (2, "sample")):
            sock.sendall(json.dumps({"id": rid, "op": op}).encode() + b"\n")
            reply = json.loads(replies.readline())
            assert reply["id"] == rid and reply["ok"] is False
            assert reply["error"].startswith("internal error: the reply could not be encoded")
        sock.close()
    finally:
        s.close()


def test_many_clients_at_once_and_a_stalled_one_blocks_nobody(server):
    s, _ = server
    stalled, _ = connect(s.path)
    stalled.sendall(b'{"id": 0, "op": "sta')  # and then nothing
    results = []

    def one(i):
        sock, replies = connect(s.path)
        for j in range(5):
            sock.sendall(json.dumps({"id": f"{i}-{j}", "op": "status"}).encode() + b"\n")
            results.append(json.loads(replies.readline())["id"] == f"{i}-{j}")
        sock.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [True] * 100
    stalled.close()



def test_close_lets_a_reply_just_answered_reach_its_client(tmp_path):
    """`workbench stop`: the engine answers stop and closes the server at once; the reply still arrives."""
    answered = threading.Event()

    def handler(op, args):
        answered.set()
        time.sleep(0.3)  # the client thread is slow to send (a busy machine) while close() runs
        return {"ok": True, "state": "stopped"}

    s = ControlServer(tmp_path / "engine.sock", handler).start()
    sock, replies = connect(s.path)
    sock.sendall(b'{"id": 1, "op": "stop"}\n')
    assert answered.wait(10)
    s.close()
    assert json.loads(replies.readline()) == {"id": 1, "ok": True, "state": "stopped"}
    sock.close()

def test_socket_is_0600_whatever_the_umask_and_long_paths_work(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "engine.sock"
    assert len(str(path)) > 108  # beyond what AF_UNIX can bind directly
    old = os.umask(0)
    try:
        s = ControlServer(path, lambda op, args: {"ok": True}).start()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        run = path.parent
        reply = client.request(run, "status")
        assert reply["ok"] is True
    finally:
        s.close()
    assert not path.exists()


def test_parse_request_keeps_the_id_of_a_bad_request():
    with pytest.raises(RequestError) as e:
        parse_request(b'{"id": "x9", "op": "fly"}')
    assert e.value.request_id == "x9"
    assert parse_request(b'{"op": "pause"}') == (None, "pause", {})


def test_attach_sigint_leaves_a_real_view_quietly(tmp_path, holders):
    run = make_run(tmp_path)
    emit(run, "state", state="running")
    emit(run, "step", step=1, max_steps=10, loss=3.0, lr=1e-3, grad_norm=0.5, tokens_per_s=1000.0, mfu=0.01,
         eta_s=5)
    holders(run)
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "attach", str(run)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    assert "state: running" in first
    second = proc.stdout.readline()
    assert second.endswith("step 1/10 | loss 3.0000 | lr 1.00e-03 | gnorm 0.5 | 1k tok/s | MFU 1.0% | ETA 5s\n")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "detached; the run goes on" in err and "Traceback" not in err

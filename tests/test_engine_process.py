"""The detached engine as its own process: detach, attach, control socket, hostile clients, crashes, resume.

Every test here talks to real engine processes training a tiny model on the CPU.
One long engine (`engine`) is shared by the tests that only need a live run; the
last of them stops it. Engines are always killed at the end, whatever happens:
a detached engine would otherwise outlive the test session.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import cli_env, events_of, tiny_config, tiny_raw, wait_for, workbench, write_toml
from safetensors.torch import load_file

from workbench.engine import config as config_mod
from workbench.engine.errors import WorkbenchError
from workbench.engine.events import read_events
from workbench.engine.process import client
from workbench.engine.process.lock import EngineLock
from workbench.engine.process.spawn import spawn_detached
from workbench.engine.run_setup import create_run
from workbench.engine.rundir import RunDir
from workbench.engine.train import train


def last_step(run: Path) -> int:
    events = [e for e in read_events(Path(run) / "events.jsonl")[0] if e["type"] == "step"]
    return events[-1]["step"] if events else 0


def pid_gone(pid: int) -> bool:
    return not client.pid_alive(pid)


def kill_engine(run: Path) -> None:
    pid = client.engine_pid(run)
    if pid and client.pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: pid_gone(pid), 10, what="the engine to die")


class LineReader:
    """Lines of a child's stdout on a thread, so a test can wait for one with a timeout."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, predicate, timeout=30.0) -> list[str]:
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"output ended first; last lines: {seen[-5:]}")
            seen.append(line)
            if predicate(line):
                return seen
        raise AssertionError(f"no matching line within {timeout} s; last lines: {seen[-5:]}")


def attach(run: Path) -> tuple[subprocess.Popen, LineReader]:
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "attach", str(run)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, LineReader(proc)


def step_of(line: str) -> int | None:
    parts = line.split()
    if len(parts) > 2 and parts[1] == "step":
        return int(parts[2].split("/")[0])
    return None


# ---- the shared live engine ------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_data, tmp_path_factory):
    """A detached engine started by the real CLI, training 'forever' (it is stopped by the last test)."""
    root = tmp_path_factory.mktemp("engine")
    config = write_toml(root / "long.toml", tiny_raw(train={"max_steps": 10_000_000},
                                                     eval={"interval": 0}, checkpoint={"interval": 0}))
    run = root / "runs" / "live"
    started = workbench("train", config, "--data", tiny_data, "--run", run, "--detach", cwd=root)
    try:
        assert started.returncode == 0, started.stderr
        yield run, started
    finally:
        kill_engine(run)


def test_detached_engine_keeps_training_after_its_parent_exits(engine):
    run, started = engine
    # The CLI that started it has exited (workbench() waited for it) and said which pid trains.
    pid = int(started.stdout.split("engine pid ")[1].split(")")[0])
    assert client.engine_pid(run) == pid and client.pid_alive(pid)
    assert os.getsid(pid) == pid  # its own session: a closing terminal or a dropped SSH sends it nothing
    before = last_step(run)
    wait_for(lambda: last_step(run) > before + 20, what="steps after the parent exited")
    os.kill(pid, signal.SIGHUP)  # what a hang-up would send, were it still in one
    at_hup = last_step(run)
    wait_for(lambda: last_step(run) > at_hup + 20, what="steps after SIGHUP")
    assert client.run_state(run) == "running"
    assert (run / "engine.log").read_text().count("state: running") == 1


def test_socket_is_private_to_its_owner(engine):
    run, _ = engine
    mode = os.stat(run / "engine.sock").st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_attach_replays_history_then_follows_with_two_readers(engine):
    run, _ = engine
    step_now = last_step(run)
    readers = [attach(run), attach(run)]
    try:
        for _, lines in readers:
            history = lines.until(lambda line: "state: running" in line)
            assert any("state: starting" in line for line in history)  # from the very start of the run
            # ...then steps that happened after the reader started: it follows live
            lines.until(lambda line: (step_of(line) or 0) > step_now + 30)
        assert client.run_state(run) == "running"
        for proc, _ in readers:
            proc.send_signal(signal.SIGINT)  # Ctrl-C detaches the view, never the run
            _, err = proc.communicate(timeout=10)
            assert proc.returncode == 0 and "the run goes on" in err
    finally:
        for proc, _ in readers:
            proc.kill()
    at = last_step(run)
    wait_for(lambda: last_step(run) > at + 10, what="steps after the readers left")


def test_every_control_op(engine):
    run, _ = engine
    status = client.request(run, "status")
    assert status["ok"] and status["state"] == "running" and status["pid"] == client.engine_pid(run)

    paused = client.request(run, "pause")
    assert paused["state"] == "paused"
    assert client.run_state(run) == "paused"
    assert events_of(run, "state")[-1]["state"] == "paused"
    at = paused["step"]
    time.sleep(0.3)
    assert client.request(run, "status")["step"] == at == last_step(run)  # nothing moves while paused

    settings = client.request(run, "set", values={"lr_scale": 0.5, "eval.interval": 7})["settings"]
    assert settings["lr_scale"] == 0.5 and settings["eval.interval"] == 7
    assert config_mod.load(run / "config.toml").eval.interval == 7  # kept for a resume
    assert "lr_scale=0.5 (was 1.0)" in events_of(run, "log")[-1]["message"]

    saved = client.request(run, "save")
    assert saved["step"] == at and Path(saved["checkpoint"]).name == f"step_{at:06d}"
    assert RunDir.at(run).latest_checkpoint().name == f"step_{at:06d}"

    metrics = client.request(run, "eval")["metrics"]
    assert metrics["val_loss"] > 0 and events_of(run, "eval")[-1]["step"] == at

    one = client.request(run, "sample", prompt="The ", max_tokens=12, temperature=0.8, seed=5)
    two = client.request(run, "sample", prompt="The ", max_tokens=12, temperature=0.8, seed=5)
    assert one["step"] == at and isinstance(one["text"], str) and one["text"] == two["text"]
    assert events_of(run, "sample")[-1]["text"] == one["text"]

    # The CLI asks the running engine too: `workbench sample` from its current (paused) weights.
    cli = workbench("sample", run, "--prompt", "The ", "--max-tokens", "12", "--seed", "5", "--json")
    assert cli.returncode == 0, cli.stderr
    live = json.loads(cli.stdout)
    assert live["checkpoint"] == "live" and live["step"] == at and live["text"] == one["text"]
    cli = workbench("eval", run, "--json")  # `workbench eval` too: a pass on the live weights
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == {**json.loads(cli.stdout), "checkpoint": "live", "step": at,
                                      "val_loss": metrics["val_loss"]}  # same weights, same batches
    cli = workbench("eval", run, "--worst", "2", "--json")  # worst documents: from the checkpoint just saved
    assert cli.returncode == 0, cli.stderr
    ranked = json.loads(cli.stdout)
    assert Path(ranked["checkpoint"]).name == f"step_{at:06d}" and len(ranked["worst_docs"]) == 2
    cli = workbench("status", run)
    assert cli.returncode == 0 and f"paused, step {at}/" in cli.stdout and "lr_scale 0.5" in cli.stdout
    listed = workbench("ls", run.parent)
    assert listed.returncode == 0 and "paused" in listed.stdout and f"{at}/10000000" in listed.stdout

    cli = workbench("resume", run)
    assert cli.returncode == 0 and "running" in cli.stdout, cli.stderr
    wait_for(lambda: len([e for e in events_of(run, "eval") if e["step"] > at]) >= 2, what="evals every 7 steps")
    later = [e for e in events_of(run, "step") if e["step"] > at]
    assert all(abs(e["lr"] - 0.5 * 3e-3) < 1e-4 for e in later)  # past warmup, cosine over 10M steps: ~lr/2
    assert all(e["step"] % 7 == 0 for e in events_of(run, "eval") if e["step"] > at)
    cli = workbench("set", run, "lr_scale=1", "eval.interval=0")
    assert cli.returncode == 0 and "lr_scale = 1.0" in cli.stdout, cli.stderr
    assert client.request(run, "status")["settings"]["eval.interval"] == 0


def test_bad_settings_and_ops_are_refused_by_the_cli(engine):
    run, _ = engine
    for args, message in ((("set", run, "lr_scale=-1"), "lr_scale must be a number > 0"),
                          (("set", run, "model.n_layer=3"), "cannot set 'model.n_layer' live"),
                          (("set", run, "eval.interval=1.5"), "eval.interval must be an integer"),
                          (("pause", run / "nope"), "no run at")):
        result = workbench(*args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr
    assert client.request(run, "status")["settings"]["lr_scale"] == 1.0  # nothing changed


def test_malformed_and_hostile_requests_get_errors_while_training_goes_on(engine):
    run, _ = engine
    before = last_step(run)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(run / "engine.sock"))
    replies = sock.makefile("rb")

    def ask(raw: bytes) -> dict:
        sock.sendall(raw)
        return json.loads(replies.readline())

    assert "malformed JSON" in ask(b'{"id": 1, "op": \n')["error"]
    assert ask(b"\xff\xfe\x00garbage\n")["ok"] is False
    assert ask(b"[1, 2, 3]\n")["error"] == "a request must be a JSON object with an op"
    unknown = ask(b'{"id": "u1", "op": "rm -rf"}\n')
    assert unknown == {"id": "u1", "ok": False, "error": unknown["error"]} and "unknown op" in unknown["error"]
    assert "unknown op" in ask(b'{"id": 2, "op": 7}\n')["error"]
    wrong = ask(b'{"id": 3, "op": "sample", "max_tokens": "many"}\n')
    assert wrong["id"] == 3 and "max_tokens must be an integer" in wrong["error"]
    assert "lr_scale must be a number" in ask(b'{"id": 4, "op": "set", "values": {"lr_scale": "fast"}}\n')["error"]
    assert "values must be an object" in ask(b'{"id": 5, "op": "set", "values": []}\n')["error"]
    assert "unexpected argument" in ask(b'{"id": 6, "op": "pause", "force": true}\n')["error"]
    # A 10 MB line: refused once it passes the limit, the rest of it skipped, the connection still usable.
    big = ask(b'{"id": 7, "op": "sample", "prompt": "' + b"a" * (10 * 2**20) + b'"}\n')
    assert big["ok"] is False and "too large" in big["error"]
    after = ask(b'{"id": 8, "op": "status"}\n')
    assert after["id"] == 8 and after["ok"] and after["state"] == "running"
    sock.close()

    # Half a request, then gone; and a crowd of clients at once.
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(str(run / "engine.sock"))
    half.sendall(b'{"id": 9, "op": "sta')
    half.close()
    answers = []

    def one_client(i):
        answers.append(client.request(run, "status")["ok"])

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == [True] * 16

    wait_for(lambda: last_step(run) > before + 20, what="training to go on")
    assert client.run_state(run) == "running" and not events_of(run, "error")
    assert client.request(run, "status")["settings"]["lr_scale"] == 1.0  # nothing was changed


def test_a_request_nested_100000_deep_gets_an_error_and_training_goes_on(engine):
    run, _ = engine
    log_before = (run / "engine.log").read_text()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(run / "engine.sock"))
    replies = sock.makefile("rb")
    deep = b'{"id": "deep", "op": "sample", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    sock.sendall(deep)
    assert json.loads(replies.readline()) == {"id": None, "ok": False, "error": "malformed JSON: nested too deeply"}
    at = last_step(run)
    sock.sendall(b'{"id": "next", "op": "status"}\n')  # the same connection answers the next request
    status = json.loads(replies.readline())
    assert status["id"] == "next" and status["ok"] and status["state"] == "running"
    sock.close()
    wait_for(lambda: last_step(run) > at + 10, what="training to go on after the deep request")
    new_log = (run / "engine.log").read_text()[len(log_before):]
    assert "Traceback" not in new_log and "RecursionError" not in new_log
    assert client.run_state(run) == "running" and not events_of(run, "error")


def test_a_second_engine_on_the_same_run_is_refused(engine, tmp_path):
    run, _ = engine
    result = workbench("train", "--resume", run, "--detach")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: an engine is already running for") and "pid" in result.stderr
    # The engine's own guard, for two starts racing past that check: the lock itself.
    with pytest.raises(WorkbenchError, match="already running"):
        EngineLock(RunDir.at(run)).acquire()
    direct = subprocess.run([sys.executable, "-m", "workbench.engine.process", str(run), "--resume"], env=cli_env(),
                            capture_output=True, text=True, timeout=120)
    assert direct.returncode == 2 and "error: an engine is already running" in direct.stderr
    assert client.run_state(run) == "running"


def test_stop_saves_a_checkpoint_and_ends_the_engine(engine):
    run, _ = engine
    pid = client.engine_pid(run)
    result = workbench("stop", run)
    assert result.returncode == 0, result.stderr
    step = int(result.stdout.split("stopped at step ")[1].split()[0])
    assert step == last_step(run)
    assert RunDir.at(run).latest_checkpoint().name == f"step_{step:06d}"
    wait_for(lambda: pid_gone(pid), 15, what="the engine to exit")
    assert client.run_state(run) == "stopped" and events_of(run, "state")[-1]["state"] == "stopped"
    assert not (run / "engine.sock").exists() and not (run / "engine.pid").exists()
    assert "no engine running" in workbench("status", run).stdout
    refused = workbench("pause", run)
    assert refused.returncode == 2 and "no engine is running" in refused.stderr and "stopped" in refused.stderr


# ---- engines of their own ---------------------------------------------------------------

def test_sigterm_saves_and_stops(tiny_data, tmp_path):
    run = tmp_path / "run"
    pid = spawn_detached(create_run(run, tiny_config(tiny_data, train={"max_steps": 10_000_000}, eval={"interval": 0},
                                          checkpoint={"interval": 0})), stats_interval=0.2)
    try:
        wait_for(lambda: last_step(run) >= 5 and events_of(run, "system"), what="steps and system stats")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: pid_gone(pid), 30, what="the engine to stop")
    finally:
        kill_engine(run)
    assert client.run_state(run) == "stopped"
    latest = RunDir.at(run).latest_checkpoint()
    assert latest.name == f"step_{last_step(run):06d}"
    assert any("SIGTERM received" in e["message"] for e in events_of(run, "log"))
    system = events_of(run, "system")
    assert system and all(e["gpus"] == [] or e["gpus"][0]["index"] == 0 for e in system)
    assert system[-1]["rss_bytes"] > 50 * 2**20  # the engine's own memory: torch is in there


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(RunDir.at(run).latest_checkpoint() / "model.safetensors")


def test_kill_9_is_reported_crashed_and_resume_matches_an_uninterrupted_run(tiny_data, tmp_path):
    raw = tiny_raw(train={"max_steps": 200, "threads": 1}, eval={"interval": 30}, checkpoint={"interval": 10})
    straight = tmp_path / "straight"
    assert train(create_run(straight, tiny_config(tiny_data, **raw)), echo=None) == "finished"
    want = {e["step"]: e["loss"] for e in events_of(straight, "step")}

    run = tmp_path / "runs" / "killed"
    pid = spawn_detached(create_run(run, tiny_config(tiny_data, **raw)))  # the library call behind `train --detach`
    try:
        client.request(run, "pause")  # hold it mid-run, after its first checkpoints
        while RunDir.at(run).latest_checkpoint() is None:
            client.request(run, "resume")
            time.sleep(0.05)
            client.request(run, "pause")
        assert last_step(run) < 200
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: pid_gone(pid), 10, what="the engine to die")
    finally:
        kill_engine(run)
    # Its lock went with it: the run is crashed, not running, whatever its pid file and last state say.
    assert (run / "engine.pid").exists() and events_of(run, "state")[-1]["state"] == "paused"
    assert client.run_state(run) == "crashed"
    assert "crashed" in workbench("ls", run.parent).stdout
    refused = workbench("pause", run)
    assert refused.returncode == 2 and "crashed" in refused.stderr

    resumed_from = int(RunDir.at(run).latest_checkpoint().name.split("_")[1])
    result = workbench("train", "--resume", run, "--detach")
    assert result.returncode == 0, result.stderr
    try:
        wait_for(lambda: client.run_state(run) == "finished", 60, what="the resumed run to finish")
    finally:
        kill_engine(run)
    events = events_of(run)
    resumed_at = max(i for i, e in enumerate(events) if e["type"] == "state" and e["state"] == "starting")
    got = {e["step"]: e["loss"] for e in events[resumed_at:] if e["type"] == "step"}
    assert sorted(got) == list(range(resumed_from + 1, 201))
    assert got == {s: want[s] for s in got}  # bit-identical losses
    a, b = final_weights(straight), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_engine_that_cannot_start_says_why_in_one_line(tiny_data, tmp_path):
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    run = create_run(tmp_path / "run", tiny_config(data))
    shutil.rmtree(data)  # the run's data moved away after the run was made
    with pytest.raises(WorkbenchError, match="no prepared dataset") as e:
        spawn_detached(run)
    assert "\n" not in str(e.value)
    assert client.run_state(run) == "crashed"
    assert events_of(run, "error") and events_of(run, "state")[-1]["state"] == "crashed"
    assert not (run / "engine.pid").exists() and not (run / "engine.sock").exists()

"""End to end in a real terminal: the `workbench` command inside tmux at 80x24, driven with
send-keys and read with capture-pane, from an empty folder through quick start to a visible loss;
then quitting the app leaves the engine training to the end. And the chat screen: a streamed
reply from a warm service, and feedback written to the run's conversations.jsonl."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.engine.process import client

REPO = Path(__file__).resolve().parent.parent
STEPS = 30

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (CI installs it)")


def workbench_command() -> str:
    """The installed console script when there is one (CI: pip install -e .), else the same entry point."""
    script = shutil.which("workbench")
    if script and Path(script).resolve().parent == Path(sys.executable).resolve().parent:
        return shlex.quote(script)
    return f"{shlex.quote(sys.executable)} -m workbench.cli"


class Tmux:
    """A private tmux server (its own socket, no user config) holding one 80x24 session."""

    def __init__(self, cwd: Path, command: str, env: dict[str, str]):
        self.socket = f"wb-test-{os.getpid()}"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        shell = f"env {exports} {command}; echo \"[exited $?]\"; sleep 600"
        self.tmux("new-session", "-d", "-s", "wb", "-x", "80", "-y", "24", "-c", str(cwd), shell)

    def tmux(self, *args: str) -> str:
        env = {**os.environ, "TERM": os.environ.get("TERM") or "xterm-256color"}  # CI may have no TERM
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], check=True, env=env,
                              capture_output=True, text=True, timeout=10).stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "wb", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "wb")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.screen())
            if match:
                return match
            time.sleep(0.25)
        raise AssertionError(f"no {pattern!r} on screen after {timeout:.0f} s; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


def test_quick_start_in_tmux_to_a_visible_loss(tmp_path):
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "WORKBENCH_QUICKSTART_STEPS": str(STEPS),
        "OMP_NUM_THREADS": "1",
        "TERM": "xterm-256color",
    }
    term = Tmux(tmp_path, workbench_command(), env)
    try:
        term.wait_for(r"No runs yet", timeout=30)
        term.wait_for(r"Quick start", timeout=10)  # the footer names the default action of enter
        term.keys("Enter")
        # preparation, then the engine starts and the dashboard shows the training loss
        term.wait_for(r"loss\s+\d+\.\d+", timeout=180)
        print("the dashboard during the run:\n" + term.screen())
        term.keys("Escape")
        row = term.wait_for(r"quickstart\s+(running|finished)\s+\d+/30\s+(\d+\.\d{3})", timeout=30)
        assert float(row.group(2)) > 0
        print("the runs list:\n" + term.screen())
        term.keys("q")
        term.wait_for(r"\[exited 0\]", timeout=15)
    finally:
        term.close()
    # leaving the app never stops training: the detached engine runs to the end on its own
    run = tmp_path / "runs" / "quickstart"
    deadline = time.monotonic() + 180
    while client.run_state(run) != "finished":
        assert client.run_state(run) in ("starting", "running"), client.run_state(run)
        assert time.monotonic() < deadline, "the engine did not finish"
        time.sleep(0.5)
    assert (run / "checkpoints" / f"step_{STEPS:06d}" / "state.json").is_file()


def test_chat_in_tmux_streams_a_reply_and_records_feedback(trained_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "base",
                    ignore=shutil.ignore_patterns("engine.*", "conversations.jsonl", "ratings.jsonl"))
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
           "TERM": "xterm-256color"}
    term = Tmux(tmp_path, workbench_command(), env)
    try:
        term.wait_for(r"base\s+finished", timeout=30)
        term.keys("h")  # the chat screen starts a warm `workbench serve` child
        term.wait_for(r"message; enter sends", timeout=120)
        term.wait_for(r"base model, not chat-tuned", timeout=10)
        term.keys("The", "Enter")
        term.wait_for(r"model: \S", timeout=60)
        term.wait_for(r"tokens", timeout=60)  # the status line once the reply has ended
        print("the chat screen:\n" + term.screen())
        term.keys("C-g")
        term.keys("Escape")
        term.wait_for(r"base\s+finished", timeout=30)
        term.keys("q")
        term.wait_for(r"\[exited 0\]", timeout=15)
    finally:
        term.close()
    lines = (runs / "base" / "conversations.jsonl").read_text().splitlines()
    assert '"type":"conversation"' in lines[0] and '"rating":"good"' in lines[-1]

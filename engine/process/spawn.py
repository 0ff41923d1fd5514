"""Starting a detached engine: `workbench train --detach` and the TUI's new runs.

    spawn_detached(run_dir, resume=..., init_from=...)
        starts `python -m workbench.engine.process RUN_DIR ...` in its own session
        (start_new_session: no controlling terminal, so closing the terminal or losing SSH
        sends it nothing), stdin from /dev/null, stdout and stderr appended to engine.log,
        and returns its pid once it is training, or raises WorkbenchError with the reason
        it could not start.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from workbench.engine.errors import WorkbenchError
from workbench.engine.process.lock import refuse_if_running
from workbench.engine.rundir import RunDir

READY_TIMEOUT_S = 180.0  # a cold torch import plus data loading on a busy 2-core machine


def child_env() -> dict[str, str]:
    """The environment of every engine child (detached engines, the TUI's prepare and sample children):
    this install's `workbench` importable whatever the cwd, output unbuffered so logs are live."""
    import workbench

    env = dict(os.environ)
    root = str(Path(workbench.__file__).resolve().parent.parent)  # a checkout, or site-packages
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_detached(run_dir: str | Path, *, resume: bool = False, init_from: str | Path | None = None,
                   stats_interval: float = 1.0, ready_timeout: float = READY_TIMEOUT_S) -> int:
    """Start the run's engine in its own session and return its pid once it is training.

    The run folder and its config.toml exist already (run_setup.create_run). Raises WorkbenchError
    with the engine's own reason if it cannot start (another engine holds the run,
    a bad config or dataset...). If it is still starting after `ready_timeout`
    seconds, returns its pid anyway: it goes on starting in the background.
    """
    run = RunDir.at(Path(run_dir).resolve())
    refuse_if_running(run.root)
    run.root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "workbench.engine.process", str(run.root), "--stats-interval", str(stats_interval)]
    if resume:
        cmd.append("--resume")
    if init_from is not None:
        cmd += ["--init-from", str(Path(init_from).resolve())]
    read_end, write_end = os.pipe()
    try:
        cmd += ["--ready-fd", str(write_end)]
        with open(run.log, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, pass_fds=(write_end,), env=child_env())
    finally:
        os.close(write_end)
    try:
        message = _read_ready(read_end, ready_timeout)
    finally:
        os.close(read_end)
    if message is None:  # still starting: leave it be
        return proc.pid
    if message.startswith("ok"):
        return proc.pid
    if message.startswith("error:"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)  # let it release the run (lock, pid, socket) before we report
        raise WorkbenchError(message[len("error:"):].strip())
    rc = proc.wait(timeout=10)  # closed the pipe without a word: it died
    raise WorkbenchError(f"the engine exited while starting (status {rc}); see {run.log}")


def _read_ready(fd: int, timeout: float) -> str | None:
    """What the engine wrote on its ready pipe, '' if it closed it silently, None on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode(errors="replace").strip()
        data += chunk

"""The run's lock: one engine per run, held with flock for the engine's whole life.

The kernel drops an flock when its process dies (kill -9 included), so a stale lock
cannot outlive a crash; `engine.pid` says which process holds it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from workbench.engine.errors import WorkbenchError
from workbench.engine.process import client
from workbench.engine.rundir import RunDir, atomic_write_text

LOCK_RETRY_S = 1.0  # a client's lock probe holds the lock for microseconds: retry that long


class EngineLock:
    """flock on engine.lock, held for the engine's life; the kernel releases it on any death."""

    def __init__(self, run: RunDir):
        self.run = run
        self.fd: int | None = None

    def acquire(self) -> EngineLock:
        fd = os.open(self.run.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + LOCK_RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise WorkbenchError(already_running(self.run)) from None
                time.sleep(0.05)
        self.fd = fd
        atomic_write_text(self.run.pid, f"{os.getpid()}\n")
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        if client.engine_pid(self.run) == os.getpid():
            self.run.pid.unlink(missing_ok=True)
        os.close(self.fd)  # drops the flock
        self.fd = None


def refuse_if_running(run_dir: str | Path) -> None:
    """WorkbenchError if an engine is alive on the run (checked before touching any of its files)."""
    run = RunDir.at(run_dir)
    if client.engine_alive(run):
        raise WorkbenchError(already_running(run))


def already_running(run: RunDir) -> str:
    pid = client.engine_pid(run)
    who = f" (pid {pid})" if pid else ""
    return (f"an engine is already running for {run.root}{who}; "
            f"watch it with `workbench attach {run.root}` or end it with `workbench stop {run.root}`")

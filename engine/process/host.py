"""The detached engine: one process per run that trains, serves the control socket and samples system stats.

`python -m workbench.engine.process RUN_DIR ...` runs `main` (started by spawn.py's spawn_detached).
The engine itself (`host`):
  - takes `engine.lock` with flock for its whole life (a second engine on the run is
    refused; the kernel drops the lock when the process dies, so a stale lock cannot
    outlive a crash), writes engine.pid;
  - serves the control socket (workbench.engine.process.server) through `SocketControl`, whose poll()
    runs queued requests on the training thread between optimizer steps;
  - samples system stats on its own thread (workbench.engine.sysstats);
  - SIGTERM or SIGINT -> save a checkpoint and end `stopped`; SIGHUP is ignored;
  - an exception that escapes training is written as an `error` event with its
    traceback and the state `crashed`.
Importing this module is cheap (torch loads only when the engine trains).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.engine.errors import WorkbenchError
from workbench.engine.events import EventWriter
from workbench.engine.process import client
from workbench.engine.process.dispatch import SocketControl
from workbench.engine.process.lock import EngineLock
from workbench.engine.process.server import ControlServer
from workbench.engine.rundir import RunDir


def _echo_to_log(line: str) -> None:
    """engine.log gets the lines a person needs; every step is in events.jsonl already."""
    if not line.startswith("step "):
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)


def host(run_dir: str | Path, *, resume: bool = False, init_from: str | None = None,
         stats_interval: float = 1.0, echo: Callable[[str], Any] | None = print, detached: bool = False,
         on_ready: Callable[[str], None] | None = None) -> str:
    """Train one run in this process with the engine's lock, control socket and system stats.

    Returns the final state (finished or stopped); an exception is recorded as
    `error` + `crashed` and raised. `on_ready("ok")` is called once training has
    begun, or `on_ready("error: ...")` if it never does. The detached main runs
    this with detached=True (its own signal handling: SIGTERM/SIGINT stop cleanly,
    SIGHUP is ignored); a foreground `workbench train` runs it too, so a foreground
    run is locked, controllable and reported `running` like a detached one.
    """
    from workbench.engine.sysstats import SystemSampler

    run = RunDir.at(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    lock = EngineLock(run).acquire()  # first: a second engine is refused before it loads torch
    try:
        from workbench.engine.train import train
    except BaseException:
        lock.release()
        raise
    on_ready = _once(on_ready)
    sampler: list[SystemSampler] = []

    def first_poll(trainer) -> None:
        if stats_interval > 0:
            sampler.append(SystemSampler(trainer.events.emit, stats_interval).start())
        on_ready("ok")

    control = SocketControl(on_first_poll=first_poll)
    server = ControlServer(run.socket, control.handle)
    final_state: str | None = None
    old_handlers = _install_signals(control) if detached else {}
    try:
        server.start()
        try:
            final_state = train(run.root, resume=resume, init_from=init_from, control=control,
                                echo=echo, handle_signals=not detached)
        except KeyboardInterrupt:  # a second Ctrl-C in the foreground: the trainer recorded `stopped`
            final_state = "stopped"
            raise
        except BaseException as e:
            final_state = "crashed"
            _record_crash(run, e)
            on_ready(f"error: {e}" if isinstance(e, WorkbenchError) else
                     f"error: the engine crashed while starting ({type(e).__name__}: {e}); see {run.log}")
            raise
        on_ready("ok")  # if it ended before its first step
        return final_state
    finally:
        for s in sampler:
            s.stop()
        control.close(final_state)
        server.close()
        _restore_signals(old_handlers)
        lock.release()


def _once(callback: Callable[[str], None] | None) -> Callable[[str], None]:
    called = False

    def once(message: str) -> None:
        nonlocal called
        if callback is not None and not called:
            called = True
            callback(message)
    return once


def _record_crash(run: RunDir, error: BaseException) -> None:
    """Make sure the run's history ends in `error` + `crashed` (train() may have written them already)."""
    last = client.tail_events(run.events, {"state": client.of_type("state")}).get("state", {})
    if last.get("state") == "crashed":
        return
    writer = EventWriter(run.events)
    try:
        if isinstance(error, WorkbenchError):
            writer.emit("error", message=str(error))
        else:
            writer.emit("error", message=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        writer.emit("state", state="crashed")
    finally:
        writer.close()


def _install_signals(control: SocketControl) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}

    def stop(signum, frame):
        control.request_stop(f"{signal.Signals(signum).name} received")

    for sig, handler in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, signal.SIG_IGN)):
        old[sig] = signal.signal(sig, handler)
    return old


def _restore_signals(old: dict) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.engine.process", description=(
        "The detached engine of one run (started by `workbench train --detach`)."))
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init-from")
    parser.add_argument("--stats-interval", type=float, default=1.0, help="seconds between system events (0 = off)")
    parser.add_argument("--ready-fd", type=int, help="a pipe to write 'ok' or 'error: ...' to once training begins")
    args = parser.parse_args(argv)

    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)  # not for any process the engine starts
    ready_pipe = os.fdopen(args.ready_fd, "w") if args.ready_fd is not None else None

    def on_ready(message: str) -> None:
        nonlocal ready_pipe
        if ready_pipe is not None:
            with contextlib.suppress(OSError):
                ready_pipe.write(message + "\n")
                ready_pipe.close()
            ready_pipe = None

    try:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} engine pid {os.getpid()} starting for {args.run_dir}",
              flush=True)
        state = host(args.run_dir, resume=args.resume, init_from=args.init_from,
                     stats_interval=args.stats_interval, echo=_echo_to_log, detached=True, on_ready=on_ready)
    except WorkbenchError as e:
        on_ready(f"error: {e}")
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except BaseException as e:
        on_ready(f"error: the engine crashed ({type(e).__name__}: {e})")
        traceback.print_exc()
        return 1
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} engine pid {os.getpid()} ended: {state}", flush=True)
    return 0 if state in ("finished", "stopped") else 1

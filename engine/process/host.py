"""The detached engine: one process per run that trains, serves the control socket and samples system stats.

    spawn_detached(run_dir, cfg, resume=..., init_from=...)   (what `workbench train --detach` calls)
        starts `python -m workbench.engine.process.host RUN_DIR ...` in its own session (start_new_session:
        no controlling terminal, so closing the terminal or losing SSH sends it nothing),
        stdin from /dev/null, stdout and stderr appended to engine.log, and returns its pid
        once it is training, or raises WorkbenchError with the reason it could not start.

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
import fcntl
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from workbench.engine.process import client
from workbench.engine.control import Control
from workbench.engine.errors import WorkbenchError
from workbench.engine.events import EventWriter
from workbench.engine.rundir import RunDir, atomic_write_text
from workbench.engine.process.server import SETTABLE, ControlServer, RequestError

READY_TIMEOUT_S = 180.0  # a cold torch import plus data loading on a busy 2-core machine
LOCK_RETRY_S = 1.0  # a client's lock probe holds the lock for microseconds: retry that long


# ---- the run's lock ----------------------------------------------------------------

class EngineLock:
    """flock on engine.lock, held for the engine's life; the kernel releases it on any death."""

    def __init__(self, run: RunDir):
        self.run = run
        self.fd: int | None = None

    def acquire(self) -> "EngineLock":
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


# ---- the socket-driven Control -------------------------------------------------------

class _Job:
    def __init__(self, op: str, args: dict[str, Any]):
        self.op, self.args = op, args
        self.reply: dict[str, Any] = {"ok": False, "error": "not answered"}
        self.done = threading.Event()

    def answer(self, **reply: Any) -> None:
        self.reply = reply
        self.done.set()


class SocketControl(Control):
    """Runs control requests on the training thread, between optimizer steps.

    `handle` is the server's handler (client threads): `status` is answered at once,
    every other op is queued and answered by poll(). While paused, poll() blocks and
    keeps answering requests. `stop` is answered when the run has ended (after its
    final checkpoint).
    """

    def __init__(self, on_first_poll: Callable[[Any], None] | None = None):
        self.paused = False
        self.trainer = None
        self.on_first_poll = on_first_poll
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._stop_jobs: list[_Job] = []
        self._stop_signal = threading.Event()
        self._stop_why = ""
        self._closed = False
        self._lock = threading.Lock()
        self.started = time.time()

    # client threads -----------------------------------------------------------------
    def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "status":
            return self.status()
        job = _Job(op, args)
        with self._lock:
            if self._closed:
                raise RequestError("the engine is shutting down")
            self._jobs.put(job)
        job.done.wait()
        return job.reply

    def request_stop(self, why: str) -> None:
        """Ask for save-and-stop from any thread or a signal handler (so: no locks, no I/O here)."""
        self._stop_why = why
        self._stop_signal.set()

    def status(self) -> dict[str, Any]:
        t = self.trainer
        if t is None:
            return {"ok": True, "state": "starting", "pid": os.getpid(), "step": None}
        state = "stopping" if t.stop_requested else "paused" if self.paused else "running"
        return {"ok": True, "state": state, "pid": os.getpid(), "step": t.step, "max_steps": t.max_steps,
                "settings": settings_of(t), "uptime_s": round(time.time() - self.started, 1)}

    # the training thread ------------------------------------------------------------
    def poll(self, trainer) -> None:
        if self.trainer is None:
            self.trainer = trainer
            if self.on_first_poll is not None:
                self.on_first_poll(trainer)
        while True:
            if self._stop_signal.is_set() and not trainer.stop_requested:
                trainer.stop_requested = True
                trainer.log(f"{self._stop_why}: stopping after this step (a checkpoint will be saved)")
            wait = self.paused and not trainer.stop_requested
            try:
                job = self._jobs.get(timeout=0.25) if wait else self._jobs.get_nowait()
            except queue.Empty:
                if wait:
                    continue
                return
            self._run(job, trainer)

    def _run(self, job: _Job, t) -> None:
        try:
            if job.op == "pause":
                if not self.paused:
                    self.paused = True
                    t.emit_state("paused")
                job.answer(ok=True, state="paused", step=t.step)
            elif job.op == "resume":
                if self.paused:
                    self.paused = False
                    t.emit_state("running")
                job.answer(ok=True, state="running", step=t.step)
            elif job.op == "stop":
                t.stop_requested = True
                self._stop_jobs.append(job)  # answered by close(), once the final checkpoint is written
            elif job.op == "save":
                path = t.save_checkpoint()
                job.answer(ok=True, step=t.step, checkpoint=str(path))
            elif job.op == "eval":
                job.answer(ok=True, step=t.step, metrics=t.run_eval())
            elif job.op == "sample":
                job.answer(ok=True, step=t.step, text=t.sample(**job.args))
            elif job.op == "set":
                before, values = settings_of(t), job.args["values"]
                for key, value in values.items():
                    apply_setting(t, key, value)
                t.events.emit("log", level="info", settings=settings_of(t), message="set " + ", ".join(
                    f"{k}={v} (was {before[k]})" for k, v in values.items()))
                job.answer(ok=True, settings=settings_of(t))
            else:  # the server only lets known ops through
                job.answer(ok=False, error=f"unknown op {job.op!r}")
        except WorkbenchError as e:
            job.answer(ok=False, error=str(e))
        except Exception as e:  # a failed eval or sample is reported; training goes on
            t.events.emit("log", level="error", message=f"{job.op} failed: {type(e).__name__}: {e}",
                          traceback=traceback.format_exc())
            job.answer(ok=False, error=f"{job.op} failed: {type(e).__name__}: {e}")

    def close(self, final_state: str | None) -> None:
        """Answer every request still waiting; no new ones are taken."""
        with self._lock:
            self._closed = True
        step = self.trainer.step if self.trainer is not None else None

        def answer_stop(job: _Job) -> None:
            if final_state in ("stopped", "finished"):
                job.answer(ok=True, state=final_state, step=step)
            else:
                job.answer(ok=False, error=f"the run ended {final_state} at step {step}; see its error events")

        for job in self._stop_jobs:
            answer_stop(job)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job.op == "stop":
                answer_stop(job)
            else:
                job.answer(ok=False, error=f"the run has ended ({final_state}) before {job.op!r} could run")


def settings_of(trainer) -> dict[str, Any]:
    cfg = trainer.cfg
    return {"lr_scale": trainer.lr_scale, "eval.interval": cfg.eval.interval,
            "eval.sample_interval": cfg.eval.sample_interval, "checkpoint.interval": cfg.checkpoint.interval}


def apply_setting(trainer, key: str, value) -> None:
    assert key in SETTABLE, key
    if key == "lr_scale":
        trainer.lr_scale = float(value)
    else:
        section, name = key.split(".")
        setattr(getattr(trainer.cfg, section), name, int(value))
        # Intervals outlive this engine: a resumed run reads them back from config.toml.
        # (lr_scale is in every checkpoint's state instead.)
        from workbench.engine.config import to_toml

        atomic_write_text(trainer.rundir.config, to_toml(trainer.cfg))


# ---- the engine main ---------------------------------------------------------------

def _echo_to_log(line: str) -> None:
    """engine.log gets the lines a person needs; every step is in events.jsonl already."""
    if not line.startswith("step "):
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)


def host(run_dir: str | Path, cfg=None, *, resume: bool = False, init_from: str | None = None,
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
            final_state = train(run.root, cfg, resume=resume, init_from=init_from, control=control,
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
    parser = argparse.ArgumentParser(prog="python -m workbench.engine.process.host", description=(
        "The detached engine of one run (started by `workbench train --detach`)."))
    parser.add_argument("run_dir")
    parser.add_argument("--config-json", help="the run's configuration (a new run); omit with --resume")
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
        cfg = None
        if args.config_json:
            from workbench.engine import config as config_mod
            cfg = config_mod.from_dict(json.loads(args.config_json))
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} engine pid {os.getpid()} starting for {args.run_dir}",
              flush=True)
        state = host(args.run_dir, cfg, resume=args.resume, init_from=args.init_from,
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


# ---- starting it ---------------------------------------------------------------------

def _engine_env() -> dict[str, str]:
    """This checkout's packages importable from the engine, whatever the cwd."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_detached(run_dir: str | Path, cfg=None, *, resume: bool = False, init_from: str | Path | None = None,
                   stats_interval: float = 1.0, ready_timeout: float = READY_TIMEOUT_S) -> int:
    """Start the run's engine in its own session and return its pid once it is training.

    `cfg` (a RunConfig) for a new run, or None with resume=True. Raises WorkbenchError
    with the engine's own reason if it cannot start (another engine holds the run,
    a bad config or dataset...). If it is still starting after `ready_timeout`
    seconds, returns its pid anyway: it goes on starting in the background.
    """
    run = RunDir.at(Path(run_dir).resolve())
    refuse_if_running(run.root)
    run.root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "workbench.engine.process.host", str(run.root), "--stats-interval", str(stats_interval)]
    if cfg is not None:
        cmd += ["--config-json", json.dumps(cfg.to_dict())]
    if resume:
        cmd.append("--resume")
    if init_from is not None:
        cmd += ["--init-from", str(Path(init_from).resolve())]
    read_end, write_end = os.pipe()
    try:
        cmd += ["--ready-fd", str(write_end)]
        with open(run.log, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, pass_fds=(write_end,), env=_engine_env())
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


if __name__ == "__main__":
    sys.exit(main())

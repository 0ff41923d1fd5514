"""The request dispatcher: control requests run on the training thread, between optimizer steps.

The socket server (server.py) hands each checked request to `SocketControl.handle` on
the client's thread; `status` is answered at once, every other op is queued and run by
`poll()`, which the trainer calls after every step (see engine/control.py). The ops and
the live-settable keys are the tables in ops.py.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from workbench.engine.control import Control
from workbench.engine.errors import WorkbenchError
from workbench.engine.process.ops import OPS, SETTABLE, RequestError
from workbench.engine.rundir import atomic_write_text


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
        if not OPS[op].queued:  # status
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

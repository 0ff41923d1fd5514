"""A run's history, folded from its events: what the dashboard draws.

`RunHistory.ingest(events)` is fed every event once, in order (replay from offset 0,
then only new ones). It keeps every step's metrics in compact arrays, so a run of a
million steps costs tens of megabytes, not gigabytes of dicts, and only the recent
tail of everything else (system stats, log lines, samples). `view()` hands the UI a
small immutable snapshot, downsampled for plotting, so the UI thread never walks the
whole history and never shares mutable state with the thread that reads the file.

It is fed events of the current schema only (workbench.engine.events: read_events and
EventReader upgrade old runs' events and skip what does not fit), so it indexes their
fields directly. Pure Python and numpy; no Textual, no torch.
"""

from __future__ import annotations

import bisect
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.engine import formatting as fmt
from workbench.engine.events import AnyEvent, Checkpoint, Error, Eval, Gpu, Log, Sample, State, Step, System

STEP_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu")  # kept for every step
EVAL_FIELDS = ("step", "val_loss", "val_bpb")  # kept for every eval
RECENT_FIELDS = ("lr", "grad_norm", "tokens_per_s", "mfu")  # kept for the last recent_len steps
for _names, _event in ((STEP_FIELDS + RECENT_FIELDS, Step), (EVAL_FIELDS, Eval)):
    if not set(_names) <= _event.__required_keys__:
        raise ImportError(f"history: {set(_names) - _event.__required_keys__} are not {_event.__name__} fields")


def _num(value: Any) -> float:
    """A float for the arrays; missing or non-numeric values become NaN (drawn as gaps)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")
    return float(value)


def downsample(x: np.ndarray, *ys: np.ndarray, max_points: int) -> tuple[np.ndarray, ...]:
    """At most `max_points` points: the mean of equal runs of consecutive points.

    Bucket means smooth the noisy loss as a bonus; the last point stays the last bucket's.
    """
    n = len(x)
    if n <= max_points:
        return (x, *ys)
    starts = np.linspace(0, n, max_points + 1).astype(np.int64)[:-1]
    counts = np.diff(np.append(starts, n))
    out = [np.add.reduceat(x, starts) / counts]
    for y in ys:
        finite = np.isfinite(y)
        total = np.add.reduceat(np.where(finite, y, 0.0), starts)
        seen = np.add.reduceat(finite.astype(np.float64), starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(seen > 0, total / np.maximum(seen, 1), np.nan))
    return tuple(out)


@dataclass(frozen=True)
class GpuView:
    index: int
    name: str
    util: list[float]            # recent utilisation %, oldest first
    mem_frac: list[float]        # recent memory used / total
    latest: Gpu


@dataclass(frozen=True)
class HistoryView:
    """What the dashboard renders; plain values, safe to hand to another thread."""
    state: str | None
    max_steps: int | None
    latest: Step | None                        # the newest step event
    steps: np.ndarray                          # downsampled train curve: step, tokens, loss
    tokens: np.ndarray
    loss: np.ndarray
    eval_steps: np.ndarray                     # every eval, oldest first: step, tokens at that step, val loss, bpb
    eval_tokens: np.ndarray
    val_loss: np.ndarray
    val_bpb: np.ndarray
    recent: dict[str, list[float]]             # recent lr, grad_norm, tokens_per_s, mfu for sparklines
    cpu: list[float]
    ram: list[float]
    system: System | None                      # the newest system event
    gpus: list[GpuView]
    samples: list[Sample]                      # newest last
    checkpoints: list[Checkpoint]
    n_steps: int
    errors: int


class RunHistory:
    def __init__(self, system_len: int = 300, recent_len: int = 120, log_len: int = 500, samples_len: int = 20):
        self.cols = {name: array("d") for name in STEP_FIELDS}
        self.evals = {name: array("d") for name in EVAL_FIELDS}
        self.latest: Step | None = None
        self.state: str | None = None
        self.state_event: State | None = None
        self.max_steps: int | None = None
        self.recent = {name: deque(maxlen=recent_len) for name in RECENT_FIELDS}
        self.cpu: deque[float] = deque(maxlen=system_len)
        self.ram: deque[float] = deque(maxlen=system_len)
        self.system: System | None = None
        self.gpu_util: dict[int, deque] = {}
        self.gpu_mem: dict[int, deque] = {}
        self.system_len = system_len
        self.log: deque[dict[str, Any]] = deque(maxlen=log_len)
        self.samples: deque[Sample] = deque(maxlen=samples_len)
        self.checkpoints: list[Checkpoint] = []
        self.errors = 0
        self._new_log: list[dict[str, Any]] = []

    # ------------------------------------------------------------ folding events

    def ingest(self, events: list[AnyEvent]) -> None:
        for event in events:
            getattr(self, f"_on_{event['type']}")(event)

    def _on_state(self, e: State) -> None:
        self.state = e["state"]
        self.state_event = e
        self._add_log(e, "state", fmt.format_event(e))

    def _on_step(self, e: Step) -> None:
        step = e["step"]
        steps = self.cols["step"]
        if steps and step <= steps[-1]:
            # the engine went back (resume from an older checkpoint, NaN rollback): drop what it undid
            cut = bisect.bisect_left(steps, step)
            for col in self.cols.values():
                del col[cut:]
            self._drop_evals_from(step)  # and the evals and checkpoints of the undone steps
            self.checkpoints = [c for c in self.checkpoints if c["step"] < step]
        for name in STEP_FIELDS:
            self.cols[name].append(_num(e[name]))
        for name, values in self.recent.items():
            values.append(_num(e[name]))
        self.latest = e
        self.max_steps = e["max_steps"]

    def _on_eval(self, e: Eval) -> None:
        self._drop_evals_from(e["step"])
        for name in EVAL_FIELDS:
            self.evals[name].append(_num(e[name]))
        self._add_log(e, "eval", f"eval @ {e['step']}: val loss {fmt.loss(e['val_loss'])}, "
                                 f"bpb {fmt.loss(e['val_bpb'])}")

    def _drop_evals_from(self, step: float) -> None:
        """Forget evals at `step` and after (the run went back)."""
        steps = self.evals["step"]
        if not steps or step > steps[-1]:
            return
        cut = bisect.bisect_left(steps, step)
        for col in self.evals.values():
            del col[cut:]

    def _on_sample(self, e: Sample) -> None:
        self.samples.append(e)

    def _on_checkpoint(self, e: Checkpoint) -> None:
        self.checkpoints.append(e)
        self._add_log(e, "checkpoint", f"checkpoint {checkpoint_name(e)} saved")

    def _on_system(self, e: System) -> None:
        self.system = e
        self.cpu.append(_num(e["cpu_percent"]))
        self.ram.append(_share(e["ram_used_bytes"], e["ram_total_bytes"]))
        for gpu in e["gpus"]:
            i = gpu["index"]
            self.gpu_util.setdefault(i, deque(maxlen=self.system_len)).append(_num(gpu["util_percent"]))
            self.gpu_mem.setdefault(i, deque(maxlen=self.system_len)).append(
                _share(gpu["mem_used_bytes"], gpu["mem_total_bytes"]))

    def _on_log(self, e: Log) -> None:
        self._add_log(e, e["level"], e["message"])

    def _on_error(self, e: Error) -> None:
        self.errors += 1
        self._add_log(e, "error", e["message"])

    def _add_log(self, e: AnyEvent, level: str, message: str) -> None:
        entry = {"t": e["t"], "level": level, "message": message, "type": e["type"]}
        self.log.append(entry)
        self._new_log.append(entry)
        if len(self._new_log) > self.log.maxlen:
            del self._new_log[: -self.log.maxlen]

    # ------------------------------------------------------------ handing out

    def take_new_log(self) -> list[dict[str, Any]]:
        """Log entries added since the last call (at most the log's length)."""
        new, self._new_log = self._new_log, []
        return new

    def view(self, max_points: int = 400) -> HistoryView:
        """A snapshot for the UI. Call it from the thread that ingests (it reads the arrays in place)."""
        c = {name: np.frombuffer(col, dtype=np.float64) for name, col in self.cols.items()}
        # copies: the snapshot must not pin the arrays' buffers (array.append could not grow them)
        steps, tokens, loss = (a.copy() for a in downsample(c["step"], c["tokens"], c["loss"], max_points=max_points))
        ev = {name: np.frombuffer(col, dtype=np.float64).copy() for name, col in self.evals.items()}
        if len(c["step"]) and len(ev["step"]):
            eval_tokens = np.interp(ev["step"], c["step"], c["tokens"])
        else:
            eval_tokens = np.full(len(ev["step"]), np.nan)
        n_steps = len(c["step"])
        del c
        gpus = []
        for gpu in self.system["gpus"] if self.system else []:
            i = gpu["index"]
            gpus.append(GpuView(i, gpu["name"] or f"GPU {i}", list(self.gpu_util.get(i, ())),
                                list(self.gpu_mem.get(i, ())), gpu))
        return HistoryView(
            state=self.state, max_steps=self.max_steps, latest=self.latest,
            steps=steps, tokens=tokens, loss=loss,
            eval_steps=ev["step"], eval_tokens=eval_tokens, val_loss=ev["val_loss"], val_bpb=ev["val_bpb"],
            recent={name: list(values) for name, values in self.recent.items()},
            cpu=list(self.cpu), ram=list(self.ram), system=self.system, gpus=gpus,
            samples=list(self.samples), checkpoints=list(self.checkpoints),
            n_steps=n_steps, errors=self.errors,
        )


def _share(used: int | None, total: int | None) -> float:
    """used / total in percent; NaN (a gap) when either is unknown."""
    return used / total * 100 if used is not None and total else float("nan")


def checkpoint_name(e: Checkpoint) -> str:
    """The checkpoint's folder name, e.g. step_000300."""
    return e["path"].rstrip("/").rsplit("/", 1)[-1] or f"step {e['step']}"

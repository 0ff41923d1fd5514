"""A run's history, folded from its events: what the dashboard draws.

`RunHistory.ingest(events)` is fed every event once, in order (replay from offset 0,
then only new ones). It keeps every step's metrics in compact arrays, so a run of a
million steps costs tens of megabytes, not gigabytes of dicts, and only the recent
tail of everything else (system stats, log lines, samples). `view()` hands the UI a
small immutable snapshot, downsampled for plotting, so the UI thread never walks the
whole history and never shares mutable state with the thread that reads the file.

Pure Python and numpy; no Textual, no torch.
"""

from __future__ import annotations

import bisect
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

STEP_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu")
EVAL_FIELDS = ("step", "val_loss", "val_bpb")


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
    latest: dict[str, Any]


@dataclass(frozen=True)
class HistoryView:
    """What the dashboard renders; plain values, safe to hand to another thread."""
    state: str | None
    max_steps: int | None
    latest: dict[str, Any]                     # the newest step event
    last_eval: dict[str, Any]                  # the newest eval event
    steps: np.ndarray                          # downsampled train curve: step, tokens, loss
    tokens: np.ndarray
    loss: np.ndarray
    eval_steps: np.ndarray                     # every eval: step, tokens at that step, val loss
    eval_tokens: np.ndarray
    val_loss: np.ndarray
    val_bpb: np.ndarray
    recent: dict[str, list[float]]             # recent lr, grad_norm, tokens_per_s, mfu for sparklines
    cpu: list[float]
    ram: list[float]
    system: dict[str, Any]                     # the newest system event
    gpus: list[GpuView]
    samples: list[dict[str, Any]]              # newest last
    checkpoints: list[dict[str, Any]]
    n_steps: int
    errors: int


class RunHistory:
    def __init__(self, system_len: int = 300, recent_len: int = 120, log_len: int = 500, samples_len: int = 20):
        self.cols = {name: array("d") for name in STEP_FIELDS}
        self.evals = {name: array("d") for name in EVAL_FIELDS}
        self.latest: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.state: str | None = None
        self.state_event: dict[str, Any] = {}
        self.max_steps: int | None = None
        self.recent = {name: deque(maxlen=recent_len) for name in ("lr", "grad_norm", "tokens_per_s", "mfu")}
        self.cpu: deque[float] = deque(maxlen=system_len)
        self.ram: deque[float] = deque(maxlen=system_len)
        self.system: dict[str, Any] = {}
        self.gpu_util: dict[int, deque] = {}
        self.gpu_mem: dict[int, deque] = {}
        self.system_len = system_len
        self.log: deque[dict[str, Any]] = deque(maxlen=log_len)
        self.samples: deque[dict[str, Any]] = deque(maxlen=samples_len)
        self.checkpoints: list[dict[str, Any]] = []
        self.errors = 0
        self._new_log: list[dict[str, Any]] = []

    # ------------------------------------------------------------ folding events

    def ingest(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            handler = getattr(self, f"_on_{event.get('type')}", None)
            if handler is not None:
                try:
                    handler(event)
                except (TypeError, ValueError, KeyError, AttributeError):
                    continue  # an event of an unexpected shape is not worth a crash

    def _on_state(self, e: dict[str, Any]) -> None:
        self.state = e.get("state") or self.state
        self.state_event = e
        if isinstance(e.get("max_steps"), int):
            self.max_steps = e["max_steps"]
        self._add_log(e, "state", f"state: {self.state}" + (f" ({e['reason']})" if e.get("reason") else ""))

    def _on_step(self, e: dict[str, Any]) -> None:
        step = _num(e.get("step"))
        steps = self.cols["step"]
        if steps and step <= steps[-1]:
            # the engine went back (resume from an older checkpoint, NaN rollback): drop what it undid
            cut = bisect.bisect_left(steps, step)
            for col in self.cols.values():
                del col[cut:]
            self._drop_evals_from(step)  # and the evals and checkpoints of the undone steps
            self.checkpoints = [c for c in self.checkpoints if not (_num(c.get("step")) >= step)]
        for name in STEP_FIELDS:
            self.cols[name].append(_num(e.get(name)))
        for name, values in self.recent.items():
            values.append(_num(e.get(name)))
        self.latest = e
        if isinstance(e.get("max_steps"), int):
            self.max_steps = e["max_steps"]

    def _on_eval(self, e: dict[str, Any]) -> None:
        self._drop_evals_from(_num(e.get("step")))
        for name in EVAL_FIELDS:
            self.evals[name].append(_num(e.get(name)))
        self.last_eval = e
        self._add_log(e, "eval", f"eval @ {e.get('step')}: val loss {_fmt(e.get('val_loss'))}"
                                 f", bpb {_fmt(e.get('val_bpb'))}")

    def _drop_evals_from(self, step: float) -> None:
        """Forget evals at `step` and after (the run went back); the newest one left is the latest."""
        steps = self.evals["step"]
        if not steps or step > steps[-1]:
            return
        cut = bisect.bisect_left(steps, step)
        for col in self.evals.values():
            del col[cut:]
        self.last_eval = {name: col[-1] for name, col in self.evals.items()} if cut else {}

    def _on_sample(self, e: dict[str, Any]) -> None:
        self.samples.append(e)

    def _on_checkpoint(self, e: dict[str, Any]) -> None:
        self.checkpoints.append(e)
        name = str(e.get("path", "")).rstrip("/").rsplit("/", 1)[-1] or f"step {e.get('step')}"
        self._add_log(e, "checkpoint", f"checkpoint {name} saved")

    def _on_system(self, e: dict[str, Any]) -> None:
        self.system = e
        self.cpu.append(_num(_first(e, "machine_cpu_percent", "cpu_percent")))
        used, total = _first(e, "ram_used_bytes", "ram_used"), _first(e, "ram_total_bytes", "ram_total")
        self.ram.append(_num(used) / _num(total) * 100 if total else float("nan"))
        for gpu in e.get("gpus") or []:
            i = int(gpu.get("index", 0))
            util = self.gpu_util.setdefault(i, deque(maxlen=self.system_len))
            mem = self.gpu_mem.setdefault(i, deque(maxlen=self.system_len))
            util.append(_num(_first(gpu, "util_percent", "util")))
            used, total = _first(gpu, "mem_used_bytes", "mem_used"), _first(gpu, "mem_total_bytes", "mem_total")
            mem.append(_num(used) / _num(total) * 100 if total else float("nan"))

    def _on_log(self, e: dict[str, Any]) -> None:
        self._add_log(e, e.get("level") or "info", str(e.get("message", "")))

    def _on_error(self, e: dict[str, Any]) -> None:
        self.errors += 1
        self._add_log(e, "error", str(e.get("message", "error")))

    def _add_log(self, e: dict[str, Any], level: str, message: str) -> None:
        entry = {"t": e.get("t"), "level": level, "message": message, "type": e.get("type")}
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
        for gpu in self.system.get("gpus") or []:
            i = int(gpu.get("index", 0))
            gpus.append(GpuView(i, str(gpu.get("name") or f"GPU {i}"), list(self.gpu_util.get(i, ())),
                                list(self.gpu_mem.get(i, ())), dict(gpu)))
        return HistoryView(
            state=self.state, max_steps=self.max_steps, latest=dict(self.latest), last_eval=dict(self.last_eval),
            steps=steps, tokens=tokens, loss=loss,
            eval_steps=ev["step"], eval_tokens=eval_tokens, val_loss=ev["val_loss"], val_bpb=ev["val_bpb"],
            recent={name: list(values) for name, values in self.recent.items()},
            cpu=list(self.cpu), ram=list(self.ram), system=dict(self.system), gpus=gpus,
            samples=list(self.samples), checkpoints=list(self.checkpoints),
            n_steps=n_steps, errors=self.errors,
        )


def _first(d: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    return None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"

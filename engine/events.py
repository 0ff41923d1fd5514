"""events.jsonl: the run's append-only history, one JSON object a line.

The protocol is the TypedDicts below, one per event type: their fields, types and
docstrings (meaning and unit of every field) are the whole definition, and the
writer's checks and the readers' parsing are derived from them. Every event has
`v` (SCHEMA_VERSION when written), `t` (unix time, seconds) and `type`.

Writing: `EventWriter.emit(type, **fields)` checks the event against its definition
and raises SchemaError for an unknown type, a missing or unknown field or a value of
the wrong type: that is a bug in the writer, never something to write down. It
appends whole lines under a lock and flushes each one, so a reader never waits long
and a crash leaves at worst one torn last line, which readers skip until it is
completed.

Reading: `read_events` / `EventReader` (and the client's backwards `tail_events`,
through `parse`) hand out events of this schema only. Lines written by an older
release are brought up to date by `upgrade_v1`, the one place that knows old
runs; a line that still does not fit (corrupt, hand-edited) is skipped like a torn
one, and fields this version does not know (a newer writer's) are dropped. So a
reader indexes required fields directly, uses .get() only for the NotRequired ones,
and never needs a fallback.

This module imports no torch: the TUI and the client read events through it.
Nothing here may use `from __future__ import annotations`: the TypedDicts are read
at run time, and NotRequired must not be a string.
"""

import json
import math
import os
import threading
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, TypedDict, Union

SCHEMA_VERSION = 2


class SchemaError(Exception):
    """An event that does not match its definition: a bug in whoever wrote it.

    Not a ValueError, so that no `except ValueError` on the way (the stats thread ends
    quietly on one at shutdown) can swallow it.
    """


class Range:
    """Annotated metadata: the value lies in [low, high]."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __repr__(self) -> str:
        return f"Range({self.low}, {self.high})"


Seconds = float      # a duration or a point in time, in seconds
Bytes = int          # a size in bytes
Percent = Annotated[float, Range(0, 100)]  # a share in percent, 0-100
StateName = Literal["starting", "running", "paused", "finished", "stopped", "crashed"]
LogLevel = Literal["info", "warning", "error"]


# ---- the events ----------------------------------------------------------------------------------------

class _Event(TypedDict):
    v: int
    t: Seconds


class State(_Event):
    """The engine's state changed.

    state      starting (the engine began, before setup), running (training steps),
               paused, finished (reached max_steps or the time budget), stopped (by a
               request or a signal, after saving a checkpoint), crashed (an error event
               comes just before)
    device     running only: the device trained on, e.g. "NVIDIA H100 80GB HBM3" or
               "cpu (8 threads)"
    dtype      running only: the compute dtype, "float32" or "bfloat16"
    kernels    running only: the kernel set, "torch" (reference ops) or "cupy"

    Every running state this version writes has device, dtype and kernels; a v1
    run's may lack them (see upgrade_v1).
    """
    type: Literal["state"]
    state: StateName
    device: NotRequired[str]
    dtype: NotRequired[str]
    kernels: NotRequired[str]


class Step(_Event):
    """Training progress, every train.log_interval optimizer steps (and at the last one).

    step          optimizer steps done, this one included (the first step is 1)
    max_steps     the step the run trains to (train.max_steps)
    loss          mean training loss of the steps since the last step event, nats per token
    lr            learning rate of this step
    grad_norm     global L2 norm of this step's gradients, before clipping
    tokens        training tokens seen so far
    tokens_per_s  training throughput since the last step event, tokens/s (step time only:
                  evals, checkpoints and pauses are not counted)
    mfu           model FLOPs utilisation since the last step event, a fraction 0-1 of the
                  device's peak; None when the peak is unknown
    eta_s         estimated seconds of training left
    elapsed_s     seconds of training so far (steps, evals and checkpoints; pauses excluded)
    """
    type: Literal["step"]
    step: int
    max_steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    mfu: Annotated[float, Range(0, 1)] | None
    eta_s: Seconds
    elapsed_s: Seconds


class Eval(_Event):
    """A validation pass (periodic, asked for, or the final one).

    step      the step whose weights were evaluated
    val_loss  mean loss over the evaluated val tokens, nats per token
    val_ppl   perplexity, exp(val_loss)
    val_bpb   bits per UTF-8 byte of text (comparable across tokenizers); None when
              the evaluated tokens hold no text bytes
    """
    type: Literal["eval"]
    step: int
    val_loss: float
    val_ppl: float
    val_bpb: float | None


class Sample(_Event):
    """Text generated from the current weights (periodic, or asked for).

    step    the step whose weights generated it
    prompt  the prompt ("" for none)
    text    the generated text, prompt excluded
    """
    type: Literal["sample"]
    step: int
    prompt: str
    text: str


class Checkpoint(_Event):
    """A checkpoint was written (complete, and `latest` points at it).

    step      the step it holds
    path      its folder, relative to the run folder, e.g. "checkpoints/step_000300"
    val_loss  the val loss at that step, nats per token, if an eval ran at that very step, else None
    """
    type: Literal["checkpoint"]
    step: int
    path: str
    val_loss: float | None


class Gpu(TypedDict):
    """One GPU as NVML reports it; every reading but index is None when NVML cannot give it.

    index           NVML device index
    name            e.g. "NVIDIA H100 80GB HBM3"
    util_percent    utilisation over the last sample period, percent 0-100
    mem_used_bytes  memory in use on the device (every process), bytes
    mem_total_bytes the device's memory, bytes
    temp_c          temperature, degrees Celsius
    power_w         power draw, watts
    power_limit_w   enforced power limit, watts
    sm_clock_mhz    SM clock, MHz
    """
    index: int
    name: str | None
    util_percent: Percent | None
    mem_used_bytes: Bytes | None
    mem_total_bytes: Bytes | None
    temp_c: float | None
    power_w: float | None
    power_limit_w: float | None
    sm_clock_mhz: float | None


class EngineGpu(TypedDict):
    """The engine's own use of its CUDA device, as torch counts it.

    device           the CUDA device index
    allocated_bytes  memory held by tensors, bytes
    reserved_bytes   memory held by torch's caching allocator (allocated included), bytes
    """
    device: int
    allocated_bytes: Bytes
    reserved_bytes: Bytes


class System(_Event):
    """Machine and engine resources, every --stats-interval seconds (default 1) while the engine runs.

    cpu_percent          the whole machine's CPU use, percent 0-100 of all its cores
    process_cpu_percent  the engine process's CPU use, percent of one core: up to
                         100 x cpu_count
    cpu_count            logical CPUs of the machine; None when unknown
    rss_bytes            the engine process's resident memory, bytes
    ram_used_bytes       the machine's memory in use (total - available), bytes
    ram_total_bytes      the machine's memory, bytes
    gpus                 every GPU NVML sees, [] without GPU stats (see Gpu)
    engine_gpu           the engine's torch CUDA memory, None when it does not use CUDA
    """
    type: Literal["system"]
    cpu_percent: Percent
    process_cpu_percent: float
    cpu_count: int | None
    rss_bytes: Bytes
    ram_used_bytes: Bytes
    ram_total_bytes: Bytes
    gpus: list[Gpu]
    engine_gpu: EngineGpu | None


class Log(_Event):
    """A line for people: what the engine did or chose, and why.

    level      info, warning or error (a failed request; training goes on)
    message    one line of text
    settings   after a live `set`: every live setting now (lr_scale, eval.interval,
               eval.sample_interval, checkpoint.interval)
    traceback  with a failed request caused by a bug: the Python traceback
    """
    type: Literal["log"]
    level: LogLevel
    message: str
    settings: NotRequired[dict[str, float]]
    traceback: NotRequired[str]


class Error(_Event):
    """The run failed; a `crashed` state follows.

    message    what went wrong, one line
    traceback  the Python traceback, when the failure is a bug rather than the user's
               input (config, data, disk)
    """
    type: Literal["error"]
    message: str
    traceback: NotRequired[str]


AnyEvent = State | Step | Eval | Sample | Checkpoint | System | Log | Error
EVENTS: dict[str, type] = {typing.get_args(typing.get_type_hints(cls)["type"])[0]: cls
                           for cls in typing.get_args(AnyEvent)}
EVENT_TYPES = tuple(EVENTS)


# ---- checking events against their definitions --------------------------------------------------------

Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None


def _number(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _checker(tp: Any) -> Check:
    """A check for values of the annotation `tp` (the subset of typing the events use)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is int:
        return lambda x: None if type(x) is int else f"expected an int, got {x!r}"
    if tp is float:
        return lambda x: None if _number(x) else f"expected a finite number, got {x!r}"
    if tp is str:
        return lambda x: None if type(x) is str else f"expected a string, got {x!r}"
    if tp is type(None):
        return lambda x: None if x is None else f"expected None, got {x!r}"
    if origin is Annotated:
        base = _checker(args[0])
        ranges = [m for m in tp.__metadata__ if isinstance(m, Range)]

        def annotated(x: Any) -> str | None:
            problem = base(x)
            if problem is None:
                for r in ranges:
                    if not r.low <= x <= r.high:
                        return f"expected {r.low}-{r.high}, got {x!r}"
            return problem
        return annotated
    if origin in (Union, types.UnionType):
        options = [_checker(a) for a in args if a is not type(None)]
        allows_none = type(None) in args

        def union(x: Any) -> str | None:
            if x is None and allows_none:
                return None
            problems = [c(x) for c in options]
            if None in problems:
                return None
            return " or ".join(problems) + (" or None" if allows_none else "")
        return union
    if origin is Literal:
        return lambda x: None if type(x) is str and x in args else f"expected one of {', '.join(args)}, got {x!r}"
    if origin is list:
        item = _checker(args[0])

        def listed(x: Any) -> str | None:
            if type(x) is not list:
                return f"expected a list, got {x!r}"
            for i, value in enumerate(x):
                if (problem := item(value)) is not None:
                    return f"[{i}]: {problem}"
            return None
        return listed
    if origin is dict:
        value_check = _checker(args[1])

        def mapping(x: Any) -> str | None:
            if type(x) is not dict:
                return f"expected an object, got {x!r}"
            for key, value in x.items():
                if type(key) is not str:
                    return f"expected string keys, got {key!r}"
                if (problem := value_check(value)) is not None:
                    return f"[{key!r}]: {problem}"
            return None
        return mapping
    if typing.is_typeddict(tp):
        spec = _Spec(tp)
        return lambda x: spec.problem(x, strict=True)
    raise TypeError(f"events: no check for the annotation {tp!r}")


class _Spec:
    """One TypedDict's fields as checks: required and optional names, a check per field."""

    def __init__(self, cls: type) -> None:
        self.name = cls.__name__
        hints = typing.get_type_hints(cls, include_extras=True)
        self.required = frozenset(cls.__required_keys__)
        self.checks: dict[str, Check] = {name: _checker(_strip_required(tp)) for name, tp in hints.items()}

    def problem(self, event: Any, strict: bool) -> str | None:
        """What is wrong with `event`, or None. Not strict: fields it does not know are allowed."""
        if type(event) is not dict:
            return f"expected an object, got {event!r}"
        missing = self.required - event.keys()
        if missing:
            return f"missing {', '.join(sorted(missing))}"
        for name, value in event.items():
            check = self.checks.get(name)
            if check is None:
                if strict:
                    return f"unknown field {name!r}"
                continue
            if (problem := check(value)) is not None:
                return f"{name}: {problem}"
        return None


def _strip_required(tp: Any) -> Any:
    while typing.get_origin(tp) in (NotRequired, typing.Required):
        tp = typing.get_args(tp)[0]
    return tp


_SPECS = {name: _Spec(cls) for name, cls in EVENTS.items()}
_RUNNING_ONLY = ("device", "dtype", "kernels")


def check(event: dict[str, Any]) -> None:
    """Raise SchemaError unless `event` is exactly what its type's definition says."""
    spec = _SPECS.get(event.get("type")) if type(event) is dict else None
    if spec is None:
        raise SchemaError(f"unknown event type {event.get('type') if type(event) is dict else event!r}; "
                          f"known: {', '.join(EVENT_TYPES)}")
    problem = spec.problem(event, strict=True)
    if problem is None and event["type"] == "state":
        carried = [name for name in _RUNNING_ONLY if name in event]
        if event["state"] == "running" and len(carried) < len(_RUNNING_ONLY):
            problem = f"a running state carries {', '.join(_RUNNING_ONLY)}"
        elif event["state"] != "running" and carried:
            problem = f"only a running state carries {', '.join(carried)}"
    if problem is not None:
        raise SchemaError(f"{event['type']} event: {problem}")


# ---- old runs -----------------------------------------------------------------------------------------

def upgrade_v1(event: dict[str, Any], seen: dict[str, str]) -> dict[str, Any]:
    """A v1 event (written by releases before this schema) as a v2 event.

    What changed from v1:
      - system: v1 `cpu_percent` was the engine process's (percent of one core, above
        100 on several cores): it is `process_cpu_percent`; v1 `machine_cpu_percent`
        (0-100) is `cpu_percent`.
      - log: the trainer's v1 lines had no level: "info".
      - state running: v1 wrote the device and kernels only as text, in the log lines
        "kernels: NAME (why)" and "device: NAME, DTYPE, peak ..." just before it; v2
        carries them in the running state. `seen` (one dict per reader, kept across
        the reads of one file) takes them from those lines to the running states that
        follow. The lines themselves stay, as log events.
    Everything else (step, eval, sample, checkpoint, error, and every other field) is
    the same in v1 and v2.
    """
    event = {**event, "v": 2}
    kind = event.get("type")
    if kind == "system":
        if "cpu_percent" in event:
            event["process_cpu_percent"] = event.pop("cpu_percent")
        if "machine_cpu_percent" in event:
            event["cpu_percent"] = event.pop("machine_cpu_percent")
    elif kind == "log":
        event.setdefault("level", "info")
        message = event.get("message")
        if isinstance(message, str) and message.startswith("kernels: "):
            seen["kernels"] = message[len("kernels: "):].split(" (", 1)[0]
        elif isinstance(message, str) and message.startswith("device: ") and message.count(", ") >= 2:
            seen["device"], seen["dtype"], _peak = message[len("device: "):].rsplit(", ", 2)
    elif kind == "state" and event.get("state") == "running":
        event.update({k: v for k, v in seen.items() if k in _RUNNING_ONLY and k not in event})
    return event


# The lines upgrade_v1 learns from (see `seen`): a reader that does not read a file from its
# start (client.tail_events) finds the last of each and passes it through `current` first,
# whenever it holds an event that needs them.
V1_CONTEXT = {"kernels": b'"message":"kernels: ', "device": b'"message":"device: '}


def needs_context(event: dict[str, Any]) -> bool:
    """A stored event whose upgrade takes something from earlier lines (V1_CONTEXT): a v1 running state."""
    return event.get("v") == 1 and event.get("type") == "state" and event.get("state") == "running"


def current(event: Any, seen: dict[str, str] | None = None) -> AnyEvent | None:
    """A stored event as this schema defines it, or None when it does not fit one.

    Older versions are upgraded; fields this version does not know are dropped; an
    unknown type, a missing required field or a value of the wrong type means None.
    """
    if type(event) is not dict:
        return None
    version = event.get("v")
    if version == 1:
        event = upgrade_v1(event, {} if seen is None else seen)
    elif type(version) is not int or version < 1:
        return None
    spec = _SPECS.get(event.get("type"))
    if spec is None or spec.problem(event, strict=False) is not None:
        return None
    if not spec.checks.keys() >= event.keys():
        event = {k: v for k, v in event.items() if k in spec.checks}
    return event  # type: ignore[return-value]


def parse(line: bytes | str, seen: dict[str, str] | None = None) -> AnyEvent | None:
    """One line of events.jsonl as an event of this schema, or None (not JSON, or not an event)."""
    try:
        return current(json.loads(line), seen)
    except ValueError:
        return None


# ---- writing ------------------------------------------------------------------------------------------

class EventWriter:
    """Append events to a run's events.jsonl; safe to share between threads."""

    def __init__(self, path: str | Path, echo=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if _ends_torn(self.path):  # a crash mid-line: end it, or our first event would be glued to it and lost
            self._file.write("\n")
        self._lock = threading.Lock()
        self.echo = echo  # optional callable(event) for foreground printing

    def emit(self, type: str, **fields: Any) -> AnyEvent:
        """Write one event of `type` (see its TypedDict); SchemaError if it does not match."""
        event = {"v": SCHEMA_VERSION, "t": round(time.time(), 3), "type": type, **fields}
        check(event)
        line = json.dumps(event, separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
        if self.echo is not None:
            self.echo(event)
        return event  # type: ignore[return-value]

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()


def _ends_torn(path: Path) -> bool:
    """The file's last line has no newline (its writer died while writing it)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


# ---- reading ------------------------------------------------------------------------------------------

class EventReader:
    """Reads a growing events.jsonl from `offset` on, one call at a time, as events of this schema.

    It keeps its place and what upgrade_v1 learnt from the lines read so far, so a
    file read in many calls (a live dashboard, `attach`) reads as if in one.
    """

    def __init__(self, path: str | Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self.seen: dict[str, str] = {}

    def read(self, max_bytes: int | None = None) -> list[AnyEvent]:
        """The complete events after the offset, which moves past them.

        A torn last line (no newline yet) is left for the next call; a line that is
        not an event (not JSON: a crash mid-write, then more appends) is skipped.
        With `max_bytes`, read about that much (whole lines only) so that replaying a
        huge history takes bounded memory; call again for more.
        """
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read() if max_bytes is None else f.read(max_bytes)
                if max_bytes is not None and len(data) == max_bytes and b"\n" not in data:
                    data += f.readline()  # one line longer than max_bytes: take it whole
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        events = []
        for raw in data[: end + 1].splitlines():
            if raw.strip() and (event := parse(raw, self.seen)) is not None:
                events.append(event)
        return events


def read_events(path: str | Path, offset: int = 0,
                max_bytes: int | None = None) -> tuple[list[AnyEvent], int]:
    """Read complete events from byte `offset`; return them and the offset to continue from.

    One EventReader.read (see there); a reader that calls again and again should keep
    an EventReader, which also carries what upgrade_v1 needs from one call to the next.
    """
    reader = EventReader(path, offset)
    events = reader.read(max_bytes)
    return events, reader.offset

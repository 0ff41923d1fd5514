"""What a client may ask an engine: the one table of ops and the one table of live settings.

The socket server (server.py) checks every request against them (parse_request), the
dispatcher (dispatch.py) runs them, and the command line (engine/cli/control.py and the
router's help) and its timeouts read them, so an op or a setting is added here once.

A request is one JSON object on one line: {"id": ..., "op": "...", ...arguments}; the
reply echoes the id: {"id": ..., "ok": true, ...} or {"id": ..., "ok": false, "error": "..."}.
Requests are checked here (shape, types, ranges) before they reach the engine, so
malformed JSON, an unknown op or a wrong type gets an error reply and changes nothing.
This module imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class RequestError(ValueError):
    """A request that is malformed or not allowed; its message goes back to the client."""


@dataclass(frozen=True)
class Setting:
    """A value `workbench set RUN key=value` may change while the run trains."""
    kind: type  # int or float
    low: float
    high: float
    low_exclusive: bool
    help: str


SETTABLE: dict[str, Setting] = {
    "lr_scale": Setting(float, 0.0, 100.0, True, "multiplier on the scheduled learning rate"),
    "eval.interval": Setting(int, 0, 10**9, False, "steps between evaluations (0: none)"),
    "eval.sample_interval": Setting(int, 0, 10**9, False, "steps between samples (0: none)"),
    "checkpoint.interval": Setting(int, 0, 10**9, False, "steps between checkpoints (0: only the last)"),
}


@dataclass(frozen=True)
class Op:
    """One request an engine answers."""
    help: str  # one line: the command's help, and this protocol's documentation
    args: str = ""  # its arguments, for the documentation
    queued: bool = True  # run on the training thread between steps; False: answered at once
    timeout_s: float = 60.0  # how long a client waits for the reply
    command: bool = True  # `workbench OP RUN` sends it (eval and sample have commands of their own)


OPS: dict[str, Op] = {
    "status": Op("a run's state, step and live settings", queued=False),
    "pause": Op("pause a running engine between steps"),
    "resume": Op("resume a paused engine"),
    "save": Op("write a checkpoint now", timeout_s=600.0),
    "stop": Op("save a checkpoint and stop the engine", timeout_s=900.0),  # waits for the final checkpoint
    "set": Op("change live settings: " + ", ".join(SETTABLE), args='values: {"lr_scale": 0.5, ...}'),
    "eval": Op("a validation pass on the current weights", timeout_s=900.0, command=False),
    "sample": Op("generate from the current weights", args="prompt, max_tokens, temperature, top_k, top_p, seed",
                 timeout_s=600.0, command=False),
}


_NUMBER = (int, float)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, _NUMBER) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _is_id(v) -> bool:
    # JSON-RPC's rule: a string, a number or null. The reply echoes it, so it must never be a
    # container (a deeply nested one would make the reply itself fail to encode).
    return v is None or isinstance(v, str) or _is_number(v)


def _shown(value: Any) -> str:
    """A value for an error message: short, and never the repr of a container (which could be
    nested deeper than repr can recurse)."""
    if isinstance(value, (list, dict)):
        return "[...]" if isinstance(value, list) else "{...}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_setting(key: Any, value: Any) -> int | float:
    if key not in SETTABLE:
        raise RequestError(f"cannot set {_shown(key)} live (settable: {', '.join(SETTABLE)})")
    s = SETTABLE[key]
    ok = _is_int(value) if s.kind is int else _is_number(value)
    if not ok or value > s.high or value < s.low or (s.low_exclusive and value == s.low):
        bound = f"> {s.low}" if s.low_exclusive else f">= {s.low}"
        raise RequestError(f"{key} must be {'an integer' if s.kind is int else 'a number'} {bound} "
                           f"and <= {s.high}, got {_shown(value)}")
    return s.kind(value)


# sample's arguments: name -> (check, what it must be, default)
SAMPLE_ARGS: dict[str, tuple[Callable[[Any], bool], str, Any]] = {
    "prompt": (lambda v: isinstance(v, str) and len(v) <= 20_000, "a string of at most 20000 characters", ""),
    "max_tokens": (lambda v: _is_int(v) and 1 <= v <= 4096, "an integer from 1 to 4096", 64),
    "temperature": (lambda v: _is_number(v) and 0 <= v <= 10, "a number from 0 to 10", 0.8),
    "top_k": (lambda v: v is None or (_is_int(v) and v >= 0), "null or an integer >= 0", None),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", 1.0),
    "seed": (lambda v: v is None or (_is_int(v) and 0 <= v < 2**63), "null or an integer >= 0", None),
}


def parse_request(line: bytes) -> tuple[Any, str, dict[str, Any]]:
    """(id, op, checked arguments) from one request line; RequestError if it is not acceptable.

    The id is returned even when the rest is wrong, so that the error reply can echo it.
    Nothing here recurses into the parsed values (json.loads itself stops at Python's
    recursion limit), so a request nested 100,000 deep is one more malformed request.
    """
    try:
        request = json.loads(line)
    except RecursionError:
        raise RequestError("malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError("a request must be a JSON object with an op")
    rid = request.get("id")
    if not _is_id(rid):
        raise RequestError(f"the id must be a string, a number or null, got {_shown(rid)}")
    try:
        op = request.get("op")
        if not isinstance(op, str) or op not in OPS:
            raise RequestError(f"unknown op {_shown(op)} (known: {', '.join(OPS)})")
        given = {k: v for k, v in request.items() if k not in ("id", "op")}
        if op == "sample":
            args = {}
            for name, (check, expected, default) in SAMPLE_ARGS.items():
                value = given.pop(name, default)
                if not check(value):
                    raise RequestError(f"sample: {name} must be {expected}, got {_shown(value)}")
                args[name] = value
        elif op == "set":
            values = given.pop("values", None)
            if not isinstance(values, dict) or not values:
                raise RequestError('set: values must be an object such as {"lr_scale": 0.5}')
            args = {"values": {k: check_setting(k, v) for k, v in values.items()}}
        else:
            args = {}
        if given:
            raise RequestError(f"{op}: unexpected argument(s) {', '.join(sorted(map(str, given)))[:200]}")
    except RequestError as e:
        e.request_id = rid
        raise
    return rid, op, args

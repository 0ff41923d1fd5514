"""Complete events for tests that care about a few fields: the rest get plain defaults.

EventWriter.emit refuses an event that lacks a field its definition requires
(workbench.engine.events), and readers skip such lines, so a test writes whole events:

    w.emit("step", **fields("step", step=3, loss=1.0))
    f.write(json.dumps(complete({"type": "step", "step": 3})))   # with "type", v and t
"""

from __future__ import annotations

import math
import time
from typing import Any

from workbench.engine import events

RUNNING = {"device": "cpu (2 threads)", "dtype": "float32", "kernels": "torch"}


def _defaults(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    step = given.get("step", 1)
    if kind == "step":
        return {"step": step, "max_steps": max(step, 100), "loss": 3.0, "lr": 1e-3, "grad_norm": 1.0,
                "tokens": step * 1000, "tokens_per_s": 1000.0, "mfu": None, "eta_s": 0.0, "elapsed_s": float(step)}
    if kind == "eval":
        val = given.get("val_loss", 3.0)
        return {"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 700.0)), "val_bpb": None}
    if kind == "checkpoint":
        return {"step": step, "path": f"checkpoints/step_{step:06d}", "val_loss": None}
    if kind == "sample":
        return {"step": step, "prompt": "", "text": ""}
    if kind == "system":
        return {"cpu_percent": 50.0, "process_cpu_percent": 50.0, "cpu_count": 2, "rss_bytes": 500 << 20,
                "ram_used_bytes": 4 << 30, "ram_total_bytes": 16 << 30, "gpus": [], "engine_gpu": None}
    if kind == "log":
        return {"level": "info", "message": ""}
    if kind == "state" and given.get("state") == "running":
        return dict(RUNNING)
    if kind == "error":
        return {"message": "error"}
    return {}


def fields(kind: str, **given: Any) -> dict[str, Any]:
    """The fields of a complete `kind` event: `given`, and defaults for the rest."""
    return {**_defaults(kind, given), **given}


def complete(event: dict[str, Any], t: float | None = None) -> dict[str, Any]:
    """A whole current-schema event (v, t, type and every field) from a partial one with a "type"; checked."""
    given = {k: v for k, v in event.items() if k not in ("v", "t", "type")}
    whole = {"v": events.SCHEMA_VERSION, "t": event.get("t", time.time() if t is None else t),
             "type": event["type"], **fields(event["type"], **given)}
    events.check(whole)
    return whole

"""One readable line per event: the foreground `workbench train` output and `workbench attach`.

Torch-free, so the attach view and the TUI can use it without loading the engine.
"""

from __future__ import annotations

import math
import time
from typing import Any

from workbench.engine.estimates import human


def _fmt(value: Any, spec: str) -> str:
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return "?" if value is None else str(value)


def duration(seconds: Any) -> str:
    """0:42, 12:05, 1:02:03; '?' when unknown."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "?"
    h, m = divmod(int(round(seconds)), 3600)
    return f"{h}:{m // 60:02d}:{m % 60:02d}" if h else f"{m // 60}:{m % 60:02d}"


def _gb(n: Any) -> str:
    return "?" if n is None else f"{n / 2**30:.1f}"


def format_mfu(mfu: Any) -> str:
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


def terminal_safe(text: str) -> str:
    """Generated text for a terminal: control characters (byte-fallback tokens can produce ESC,
    which could drive the terminal) are shown escaped; newlines and tabs are kept."""
    return "".join(c if c in "\n\t" or c.isprintable() else repr(c)[1:-1] for c in text)


def format_event(event: dict[str, Any], clock: bool = False) -> str | None:
    """One line (an error adds its traceback) for an event; None for events not worth a line.
    `clock` prefixes the event's local time (attach shows history, where the time matters)."""
    line = _body(event)
    if line is None or not clock:
        return line
    return time.strftime("%H:%M:%S ", time.localtime(event.get("t", 0))) + line


def _body(e: dict[str, Any]) -> str | None:
    kind = e.get("type")
    if kind == "step":
        return (f"step {e.get('step')}/{e.get('max_steps', '?')} | loss {_fmt(e.get('loss'), '.4f')} | "
                f"lr {_fmt(e.get('lr'), '.2e')} | gnorm {_fmt(e.get('grad_norm'), '.2f')} | "
                f"{human(e.get('tokens_per_s') or 0)} tok/s | MFU {format_mfu(e.get('mfu'))} | "
                f"ETA {duration(e.get('eta_s'))}")
    if kind == "eval":
        bpb = e.get("val_bpb")
        return (f"eval step {e.get('step')} | val loss {_fmt(e.get('val_loss'), '.4f')} | "
                f"ppl {_fmt(e.get('val_ppl'), '.2f')} | bpb {'n/a' if bpb is None else _fmt(bpb, '.4f')}")
    if kind == "sample":
        return f"sample step {e.get('step')}: {e.get('prompt', '')!r} -> {e.get('text', '')!r}"
    if kind == "checkpoint":
        return f"saved {e.get('path', '')}"
    if kind == "state":
        return f"state: {e.get('state')}" + (f" ({e['reason']})" if e.get("reason") else "")
    if kind == "log":
        return str(e.get("message", ""))
    if kind == "error":
        text = f"error: {e.get('message', '')}"
        return text + ("\n" + e["traceback"].rstrip() if e.get("traceback") else "")
    if kind == "system":
        gpus = "  ".join(f"gpu{g.get('index')} {g.get('util_percent', '?')}% {_gb(g.get('mem_used_bytes'))}/"
                         f"{_gb(g.get('mem_total_bytes'))} GB {g.get('temp_c', '?')}C {g.get('power_w', '?')}W"
                         for g in e.get("gpus") or [])
        return (f"system: cpu {_fmt(e.get('cpu_percent'), '.0f')}% (machine "
                f"{_fmt(e.get('machine_cpu_percent'), '.0f')}%)  rss {_gb(e.get('rss_bytes'))} GB  ram "
                f"{_gb(e.get('ram_used_bytes'))}/{_gb(e.get('ram_total_bytes'))} GB" + (f"  {gpus}" if gpus else ""))
    return None

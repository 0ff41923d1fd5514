"""How numbers, sizes and durations read, everywhere: the engine's lines, `workbench ls`, the TUI.

One convention, decided here and used by every caller:

  counts     parameters, tokens, FLOPs, tokens/s, FLOP/s: SI decimal prefixes k M G T P
             (1e3 ... 1e15) and 3 significant digits: 950, 12.3k, 4.56M, 1.2G, 3T. A
             billion is G, never B (B is a byte).
  bytes      binary units KiB MiB GiB TiB PiB (2**10 ... 2**50), as memory is counted and
             sold (an "80GB" H100 has 80 GiB), for RAM, GPU memory, checkpoints and datasets
             alike, 3 significant digits: 512B, 830MiB, 1.5GiB. A used/total pair shares the
             total's unit, one decimal each: 35.0/80.0GiB.
  precision  3 significant digits for anything else that is not an integer (learning rate
             3.00e-04, gradient norm 0.851), except losses, 4 decimals (3.2104), so that runs
             compare digit by digit.
  percent    0-100 with a % sign, 0 decimals (CPU 42%); MFU, a fraction in the events, is a
             percent with one decimal: 12.3%.
  durations  s m h d, at most two units: 45s, 3m20s, 1h02m, 2d03h (an ETA, a time taken); one
             unit where a rough figure is the point (an estimate, the age of a run): 6m, 2h, 3d.
  missing    n/a: unknown, or does not apply. Tables of many runs pass na="-".
No space between a number and its prefix or unit: 1.5GiB, 12.3k tok/s, 128GFLOP/s.
A value that is None, not a number or not finite is missing.

Also here: one readable line per event (format_event), for the foreground `workbench
train` and `workbench attach`. Torch-free: the CLI views and the TUI use this module.
"""

from __future__ import annotations

import math
import time
from typing import Any

from workbench.engine.events import AnyEvent

NA = "n/a"
SI_PREFIXES = ("", "k", "M", "G", "T", "P")
BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def is_number(x: Any) -> bool:
    """A finite int or float (not a bool): a value that can be shown."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sig3(v: float) -> str:
    """3 significant digits without an exponent or trailing zeros (for |v| below 1000)."""
    a = abs(v)
    text = f"{v:.0f}" if a >= 99.95 else f"{v:.1f}" if a >= 9.995 else f"{v:.2f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _prefixed(x: float, base: int, units: tuple[str, ...]) -> str:
    v, i = float(x), 0
    while abs(v) >= 999.5 and i < len(units) - 1:  # what would round to 1000 at 3 digits goes up a unit
        v /= base
        i += 1
    return _sig3(v) + units[i]


def count(x: Any, unit: str = "", na: str = NA) -> str:
    """A count with an SI prefix: 950, 12.3k, 4.56M, 1.2G; `unit` follows: count(1.2e14, "FLOP/s") = 120TFLOP/s."""
    if not is_number(x):
        return na
    if abs(x) < 1 and x != 0:
        return f"{x:.3g}{unit}"
    return _prefixed(x, 1000, SI_PREFIXES) + unit


def nbytes(x: Any, na: str = NA) -> str:
    """A size in binary units: 512B, 12.3KiB, 830MiB, 1.5GiB."""
    if not is_number(x):
        return na
    return _prefixed(x, 1024, BINARY_UNITS)


def nbytes_pair(used: Any, total: Any, na: str = NA) -> str:
    """used/total in the total's unit, one decimal each: 35.0/80.0GiB."""
    if not is_number(total):
        return f"{nbytes(used, na)}/{na}"
    i = 0
    while abs(total) / 1024 ** i >= 999.5 and i < len(BINARY_UNITS) - 1:
        i += 1
    size = 1024 ** i
    u = f"{used / size:.1f}" if is_number(used) else na
    return f"{u}/{total / size:.1f}{BINARY_UNITS[i]}"


def sig(x: Any, digits: int = 3, na: str = NA) -> str:
    """A value with `digits` significant digits: 0.851, 3.21, 1.2e-05; from 10**digits on, a count: 12.3k."""
    if not is_number(x):
        return na
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else count(x)


def sci(x: Any, na: str = NA) -> str:
    """Learning-rate style, 3 significant digits: 3.00e-04."""
    return f"{x:.2e}" if is_number(x) else na


def fixed(x: Any, decimals: int, na: str = NA) -> str:
    """A fixed number of decimals: fixed(3.21041, 2) = 3.21."""
    return f"{x:.{decimals}f}" if is_number(x) else na


def loss(x: Any, na: str = NA) -> str:
    """A loss (or bits per byte): 4 decimals, 3.2104."""
    return fixed(x, 4, na)


def percent(x: Any, decimals: int = 0, na: str = NA) -> str:
    """A percent 0-100: 42%."""
    return f"{x:.{decimals}f}%" if is_number(x) else na


def format_mfu(mfu: Any, na: str = NA) -> str:
    """MFU, a fraction of the device's peak, as a percent: 12.3%; n/a when the peak is unknown."""
    return percent(mfu * 100, 1, na) if is_number(mfu) else na


_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def duration(seconds: Any, parts: int = 2, na: str = NA) -> str:
    """45s, 3m20s, 1h02m, 2d03h; with parts=1, the largest unit only, rounded: 45s, 3m, 1h, 2d."""
    if not is_number(seconds) or seconds < 0:
        return na
    s = int(round(seconds))
    for i, (unit, size) in enumerate(_UNITS):
        if s >= size or unit == "s":
            if parts == 1 or unit == "s":
                return f"{round(seconds / size):.0f}{unit}"
            smaller, small_size = _UNITS[i + 1]
            return f"{s // size}{unit}{(s % size) // small_size:02d}{smaller}"
    raise AssertionError("unreachable")


def terminal_safe(text: str) -> str:
    """Generated text for a terminal: control characters (byte-fallback tokens can produce ESC,
    which could drive the terminal) are shown escaped; newlines and tabs are kept."""
    return "".join(c if c in "\n\t" or c.isprintable() else repr(c)[1:-1] for c in text)


# ---- one line per event ----------------------------------------------------------------------------

def format_event(event: AnyEvent, clock: bool = False) -> str | None:
    """One line (an error adds its traceback) for an event of the current schema; None for events
    not worth a line. `clock` prefixes the event's local time (attach shows history, where the time matters)."""
    line = _body(event)
    if line is None or not clock:
        return line
    return time.strftime("%H:%M:%S ", time.localtime(event["t"])) + line


def _body(e: AnyEvent) -> str | None:
    kind = e["type"]
    if kind == "step":
        return (f"step {e['step']}/{e['max_steps']} | loss {loss(e['loss'])} | lr {sci(e['lr'])} | "
                f"gnorm {sig(e['grad_norm'])} | {count(e['tokens_per_s'])} tok/s | MFU {format_mfu(e['mfu'])} | "
                f"ETA {duration(e['eta_s'])}")
    if kind == "eval":
        return (f"eval step {e['step']} | val loss {loss(e['val_loss'])} | ppl {fixed(e['val_ppl'], 2)} | "
                f"bpb {loss(e['val_bpb'])}")
    if kind == "sample":
        return f"sample step {e['step']}: {e['prompt']!r} -> {e['text']!r}"
    if kind == "checkpoint":
        return f"saved {e['path']}"
    if kind == "state":
        return f"state: {e['state']}"
    if kind == "log":
        return e["message"]
    if kind == "error":
        text = f"error: {e['message']}"
        return text + ("\n" + e["traceback"].rstrip() if e.get("traceback") else "")
    if kind == "system":
        gpus = "  ".join(f"gpu{g['index']} {percent(g['util_percent'])} "
                         f"{nbytes_pair(g['mem_used_bytes'], g['mem_total_bytes'])} "
                         f"{fixed(g['temp_c'], 0)}C {fixed(g['power_w'], 0)}W" for g in e["gpus"])
        return (f"system: cpu {percent(e['cpu_percent'])} (engine {percent(e['process_cpu_percent'])})  "
                f"rss {nbytes(e['rss_bytes'])}  ram {nbytes_pair(e['ram_used_bytes'], e['ram_total_bytes'])}"
                + (f"  {gpus}" if gpus else ""))
    return None

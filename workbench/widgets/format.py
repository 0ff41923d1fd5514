"""Short, fixed-width-friendly number formats for the panels (every value may be missing)."""

from __future__ import annotations

import math
from typing import Any

NA = "n/a"


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any, digits: int = 4) -> str:
    """A float with `digits` significant digits: 3.214, 0.0003, 1.2e-05."""
    if not _ok(x):
        return NA
    return f"{x:.{digits}g}" if abs(x) < 1e5 else human(x)


def fixed(x: Any, decimals: int = 3) -> str:
    return f"{x:.{decimals}f}" if _ok(x) else NA


def sci(x: Any) -> str:
    """Learning-rate style: 3.0e-04."""
    return f"{x:.1e}" if _ok(x) else NA


def human(x: Any) -> str:
    """12, 12.3k, 4.56M, 1.2B."""
    if not _ok(x):
        return NA
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}" if not float(x).is_integer() else str(int(x))


def nbytes(x: Any) -> str:
    """1.5G, 830M, 12K (binary units, one decimal above 10)."""
    if not _ok(x):
        return NA
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(x) >= size:
            v = x / size
            return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{int(x)}B"


def percent(x: Any, decimals: int = 0) -> str:
    return f"{x:.{decimals}f}%" if _ok(x) else NA


def duration(seconds: Any) -> str:
    """45s, 3m20s, 1h02m, 2d03h."""
    if not _ok(seconds) or seconds < 0:
        return NA
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def nbytes_pair(used: Any, total: Any) -> str:
    """used/total in the total's unit: 35.0/80.0G."""
    if not _ok(total):
        return f"{nbytes(used)}/{NA}"
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1)):
        if abs(total) >= size or unit == "B":
            u = f"{used / size:.1f}" if _ok(used) else NA
            return f"{u}/{total / size:.1f}{unit}"
    return NA

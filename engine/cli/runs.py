"""`workbench ls [ROOT]`: every run under ROOT with its state, progress, losses, speed and age."""

from __future__ import annotations

from pathlib import Path

from workbench.engine.process.client import list_runs
from workbench.engine.errors import WorkbenchError


def add_arguments(parser) -> None:
    parser.add_argument("root", nargs="?", default="runs", help="folder holding run folders (default: runs)")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _speed(tokens_per_s) -> str:
    if tokens_per_s is None:
        return "-"
    return f"{tokens_per_s / 1000:.1f}k" if tokens_per_s >= 1000 else f"{tokens_per_s:.0f}"


def format_table(runs: list[dict]) -> str:
    header = ("NAME", "STATE", "STEP", "TRAIN", "VAL", "TOK/S", "DEVICE", "AGE")
    rows = [header]
    for r in runs:
        step = "-" if r["step"] is None else f"{r['step']}/{r['max_steps'] or '?'}"
        rows.append((r["name"], r["state"], step, _num(r["train_loss"], ".4f"), _num(r["val_loss"], ".4f"),
                     _speed(r["tokens_per_s"]), r["device"] or "-", _age(r["age_s"])))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def run(args) -> int:
    root = Path(args.root)
    if not root.is_dir():
        raise WorkbenchError(f"no runs folder at {root}")
    runs = list_runs(root)
    if not runs:
        print(f"no runs in {root}")
        return 0
    print(format_table(runs))
    return 0

"""`workbench ls [ROOT]`: every run under ROOT with its state, progress, losses, speed and age."""

from __future__ import annotations

from pathlib import Path

from workbench.engine import formatting as fmt
from workbench.engine.errors import WorkbenchError
from workbench.engine.process.client import list_runs


def add_arguments(parser) -> None:
    parser.add_argument("root", nargs="?", default="runs", help="folder holding run folders (default: runs)")


def format_table(runs: list[dict]) -> str:
    """One row per run summary (client.run_summary); '-' where a run has not reported a value yet."""
    header = ("NAME", "STATE", "STEP", "TRAIN", "VAL", "TOK/S", "DEVICE", "AGE")
    rows = [header]
    for r in runs:
        step = "-" if r["step"] is None else f"{r['step']}/{r['max_steps']}"
        rows.append((r["name"], r["state"], step, fmt.loss(r["train_loss"], na="-"), fmt.loss(r["val_loss"], na="-"),
                     fmt.count(r["tokens_per_s"], na="-"), r["device"] or "-",
                     fmt.duration(r["age_s"], parts=1, na="-")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


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

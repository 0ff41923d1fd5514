"""Helpers for the workbench app's Pilot tests (runs, new run, checkpoints, snapshots)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from event_fixtures import complete
from textual.widgets import DataTable

from workbench.app import WorkbenchApp


def run_app(tmp_path: Path, body, size=(80, 24)) -> WorkbenchApp:
    """Run the whole app headless with runs/ and data/ under tmp_path; `body(pilot, app)` drives it."""
    async def main():
        app = WorkbenchApp(tmp_path / "runs", tmp_path / "data")
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await body(pilot, app)
        return app
    return asyncio.run(main())


async def wait_for(pilot, condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            said = [n.message for n in pilot.app._notifications]
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (notifications: {said})")
        await pilot.pause(0.1)


def table_rows(screen, selector: str = "DataTable") -> list[list[str]]:
    table = screen.query_one(selector, DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def notifications(app) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]


def write_events(run: Path, events: list[dict], config: str = "[train]\nmax_steps = 100\n",
                 age_s: float | None = None) -> Path:
    """A run folder with a config and the given events (no engine): what a past run leaves behind.

    Each event needs only a "type" and the fields the test cares about; the rest get defaults
    (event_fixtures.complete), so the file holds whole events, as EventWriter writes them."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(config)
    t = time.time() - (age_s or 0)
    with open(run / "events.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(complete(e, t), separators=(",", ":")) + "\n")  # as EventWriter
    if age_s is not None:  # the run started and last wrote age_s ago
        os.utime(run / "events.jsonl", (t, t))
        os.utime(run / "config.toml", (t, t))
    return run


def finished_events(step: int = 100, loss: float = 3.25, val: float = 3.5, device: str = "cpu (2 threads)") -> list:
    return [
        {"type": "state", "state": "starting"},
        {"type": "log", "message": f"device: {device}, float32"},
        {"type": "state", "state": "running", "device": device},
        {"type": "step", "step": step, "max_steps": step, "loss": loss, "tokens_per_s": 12345.0},
        {"type": "eval", "step": step, "val_loss": val, "val_bpb": 1.2},
        {"type": "state", "state": "finished"},
    ]


def write_corpus(folder: Path, docs: int = 30, seed: int = 0) -> Path:
    """Plain-text documents of varied English-like sentences."""
    import random

    rng = random.Random(seed)
    words = ("the a model learns to predict next token from text that people wrote about rivers mountains "
             "cities music code and history of small languages which grow slowly over many years").split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        paras = [" ".join(rng.choice(words) for _ in range(50)).capitalize() + "." for _ in range(5)]
        (folder / f"doc{i:03d}.txt").write_text("\n\n".join(paras) + "\n")
    return folder

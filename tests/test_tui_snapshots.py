"""Snapshots (pytest-textual-snapshot) of the app's main screens at 80x24 and 120x40.

Update after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs. Everything shown is pinned: relative paths, ages (file times set
relative to now), checkpoint dates (TZ=UTC), and the hardware the estimates assume.
(The dashboard, rating and leaderboard snapshots live in their own test files.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from textual.widgets.data_table import ColumnKey
from workbench_pilot import finished_events, wait_for, write_events

from workbench.app import WorkbenchApp
from workbench.screens import new_run

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]
SAVED_AT = 1_767_268_800.0  # 2026-01-01 12:00 UTC


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    # the estimates panel: a fixed CPU instead of whatever runs the tests
    monkeypatch.setattr(new_run, "detect_hardware", lambda: new_run.Hardware("cpu", "cpu", 200e9, 0.25))
    monkeypatch.setattr(new_run, "measured_flops", lambda runs_root, kind: None)
    yield tmp_path
    monkeypatch.delenv("TZ")
    time.tzset()


def make_runs(root: Path) -> Path:
    runs = root / "runs"
    write_events(runs / "shakespeare-small", finished_events(step=5000, loss=1.412, val=1.538,
                                                             device="NVIDIA H100 80GB HBM3"),
                 config="[train]\nmax_steps = 5000\n", age_s=3 * 86400)
    write_events(runs / "tiny-1", finished_events(step=300, loss=4.105, val=4.312), age_s=2 * 3600)
    write_events(runs / "crashed-try", [{"type": "state", "state": "running"},
                                        {"type": "step", "step": 41, "max_steps": 1000, "loss": 6.02,
                                         "tokens_per_s": 2210.0}], config="[train]\nmax_steps = 1000\n",
                 age_s=25 * 60)
    base = runs / "tiny-1" / "checkpoints"
    for step, val in ((100, 5.01), (200, 4.52), (300, 4.312)):
        ckpt = base / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"\0" * 5_300_000)
        (ckpt / "optimizer.safetensors").write_bytes(b"\0" * 10_600_000)
        (ckpt / "state.json").write_text(json.dumps({
            "step": step, "tokens": step * 2048, "saved_at": SAVED_AT + step * 6,
            "metrics": {"val_loss": val, "val_bpb": round(val / 2.1, 4)}}))
    (base / "latest").write_text("step_000300\n")
    return runs


async def until_listed(pilot, count: int) -> None:
    """Until the runs are listed and the table has sized its columns to them (it does so when idle)."""
    screen = pilot.app.screen_stack[0]
    await wait_for(pilot, lambda: len(screen.runs) == count, what=f"{count} runs")
    name_column = screen.query_one("DataTable").columns[ColumnKey("name")]
    longest = max(len(r["name"]) for r in screen.runs.values())
    await wait_for(pilot, lambda: name_column.content_width >= longest, what="the table sized")
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES)
def test_runs_empty(snap_compare, workdir, size):
    async def ready(pilot):
        await wait_for(pilot, lambda: any(w.display for w in pilot.app.screen.query("#runs-empty")),
                       what="empty state")
        await pilot.pause()
    assert snap_compare(WorkbenchApp("runs", "data"), terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", SIZES)
def test_runs_list(snap_compare, workdir, size):
    make_runs(workdir)

    async def ready(pilot):
        await until_listed(pilot, 3)
    assert snap_compare(WorkbenchApp("runs", "data"), terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", SIZES)
def test_new_run(snap_compare, workdir, size):
    async def ready(pilot):
        await pilot.press("n")
        await wait_for(pilot, lambda: getattr(pilot.app.screen, "hardware", None) is not None, what="estimates")
        await pilot.pause()
    assert snap_compare(WorkbenchApp("runs", "data"), terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", SIZES)
def test_checkpoints(snap_compare, workdir, size):
    make_runs(workdir)

    async def ready(pilot):
        await until_listed(pilot, 3)
        table = pilot.app.screen.query_one("DataTable")
        table.move_cursor(row=table.get_row_index("runs/tiny-1"))
        await pilot.press("c")
        await wait_for(pilot, lambda: len(getattr(pilot.app.screen, "rows", [])) == 3, what="checkpoints")
        column = pilot.app.screen.query_one("DataTable").columns[ColumnKey("name")]
        await wait_for(pilot, lambda: column.content_width >= len("step_000300 latest best"), what="sized")
        await pilot.pause()
    assert snap_compare(WorkbenchApp("runs", "data"), terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", SIZES)
def test_help(snap_compare, workdir, size):
    make_runs(workdir)

    async def ready(pilot):
        await until_listed(pilot, 3)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: type(pilot.app.screen).__name__ == "HelpScreen", what="help")
        await pilot.pause()
    assert snap_compare(WorkbenchApp("runs", "data"), terminal_size=size, run_before=ready)

"""The runs screen: the list, the empty-state quick start, crash and error notifications, delete with
confirmation, and, against real engines, quick start -> stop, and a kill -9 turning `crashed`.
(Resume: test_tui_checkpoints.py.)"""

from __future__ import annotations

import json
import os
import signal

import pytest
from engine_helpers import tiny_raw
from textual.widgets import DataTable
from workbench_pilot import finished_events, notifications, run_app, table_rows, wait_for, write_events

from workbench import engine_calls
from workbench.engine.config import from_dict, to_toml
from workbench.engine.process import client
from workbench.engine.rundir import RunDir
from workbench.screens.new_run import PreparePanel
from workbench.screens.runs import RunsScreen


@pytest.fixture(autouse=True)
def one_thread_engines(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two busy cores: keep every engine to one thread


def palette_titles(app) -> list[str]:
    return [c.title for c in app.get_system_commands(app.screen)]


def test_no_runs_makes_quick_start_the_default(tmp_path):
    async def body(pilot, app):
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        await wait_for(pilot, lambda: screen.query_one("#runs-empty").display, what="the empty state")
        assert "quick start" in str(screen.query_one("#runs-empty").render()).lower()
        enter = screen.active_bindings["enter"]
        assert (enter.binding.action, enter.binding.description) == ("first_run", "Quick start")
        # nothing to open, stop or delete: those keys are hidden, New and Quick start are offered
        titles = palette_titles(app)
        assert {"Quick start", "New run", "Help", "Quit"} <= set(titles)
        assert "Delete run" not in titles and "Stop run" not in titles
        # the command palette runs them: ctrl+p, type, enter
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "CommandPalette", what="the palette")
        await pilot.press(*"new run")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "NewRunScreen", what="the new-run screen")

    run_app(tmp_path, body)


def test_help_fits_80_columns(tmp_path):
    """`?` at 80x24: every key's "what it does" is there in full, wrapped, not cut off at the right edge."""
    write_events(tmp_path / "runs" / "done", finished_events())

    async def body(pilot, app):
        screen = app.screen
        await wait_for(pilot, lambda: len(screen.runs) == 1, what="the run listed")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "HelpScreen", what="help")
        await pilot.pause(0.2)
        table = app.screen.query_one("#help-keys", DataTable)
        assert table.virtual_size.width <= table.size.width and not table.show_horizontal_scrollbar
        shown = " ".join(" ".join(str(cell) for cell in table.get_row_at(i)) for i in range(table.row_count))
        assert "Prepare the built-in corpus and train the tiny preset, detached" in shown

    run_app(tmp_path, body)


def test_lists_runs_and_turns_a_dead_engine_crashed(tmp_path):
    runs = tmp_path / "runs"
    write_events(runs / "done", finished_events(step=100, loss=3.25, val=3.5), age_s=7200)
    # says running, but no engine holds its lock: the engine died without a word
    write_events(runs / "ghost", [{"type": "state", "state": "running"},
                                  {"type": "step", "step": 7, "max_steps": 50, "loss": 5.5}], age_s=60)

    async def body(pilot, app):
        screen = app.screen
        await wait_for(pilot, lambda: len(screen.runs) == 2, what="two runs")
        rows = {r[0]: r for r in table_rows(screen)}
        assert rows["done"][1:] == ["finished", "100/100", "3.2500", "3.5000", "12.3k", "cpu", "2h"]
        assert rows["ghost"][1:4] == ["crashed", "7/50", "5.5000"]
        assert list(rows) == ["ghost", "done"]  # newest first
        # an error the engine writes while we watch becomes a notification, not a traceback
        with open(runs / "ghost" / "events.jsonl", "a") as f:
            f.write(json.dumps({"v": 1, "t": 1.0, "type": "error", "message": "CUDA out of memory"},
                               separators=(",", ":")) + "\n")
        await wait_for(pilot, lambda: any("CUDA out of memory" in n for n in notifications(app)),
                       timeout=5, what="the error notification")
        # and the status line says why the highlighted crashed run crashed
        await wait_for(pilot, lambda: "ghost crashed: CUDA out of memory" in str(
            screen.query_one("#runs-status").render()), timeout=5, what="the reason under the table")
        # every action of the screen is in the command palette
        assert {"Open dashboard", "New run", "Quick start", "Checkpoints", "Rate samples", "Leaderboard",
                "Delete run", "Resume run"} <= set(palette_titles(app))

    run_app(tmp_path, body, size=(120, 40))


def test_a_crash_seen_on_its_dashboard_is_announced_once(tmp_path):
    """The dashboard on top says the run crashed; the runs screen underneath does not say it again."""
    import fcntl

    run = write_events(tmp_path / "runs" / "watched", [{"type": "state", "state": "running"},
                                                       {"type": "step", "step": 3, "max_steps": 50, "loss": 5.0}])
    lock = os.open(run / "engine.lock", os.O_RDWR | os.O_CREAT, 0o600)  # held as an engine holds it
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (run / "engine.pid").write_text(f"{os.getpid()}\n")

    async def body(pilot, app):
        screen = app.screen
        await wait_for(pilot, lambda: (screen.runs.get(str(run)) or {}).get("state") == "running", what="running")
        await pilot.press("enter")
        await wait_for(pilot, lambda: getattr(app.screen, "state", None) == "running", what="its dashboard")
        os.close(lock)  # the engine dies without a word
        await wait_for(pilot, lambda: app.screen.state == "crashed" and screen.runs[str(run)]["state"] == "crashed",
                       timeout=10, what="crashed on both screens")
        await pilot.pause(2.5)  # more polls of the runs screen underneath
        said = [n for n in notifications(app) if "crashed" in n or "died" in n]
        assert len(said) == 1, said

    run_app(tmp_path, body)


def test_delete_asks_first(tmp_path):
    run = write_events(tmp_path / "runs" / "old", finished_events())

    async def body(pilot, app):
        screen = app.screen
        await wait_for(pilot, lambda: len(screen.runs) == 1, what="the run")
        await pilot.press("d")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", what="the question")
        await pilot.press("n")
        await wait_for(pilot, lambda: app.screen is screen, what="the runs screen")
        assert run.is_dir()
        await pilot.press("d")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", what="the question")
        await pilot.press("y")
        await wait_for(pilot, lambda: not run.exists() and not screen.runs, what="the run deleted")
        await wait_for(pilot, lambda: screen.query_one("#runs-empty").display, what="the empty state")

    run_app(tmp_path, body)


def test_quick_start_trains_then_stop(tmp_path, monkeypatch):
    """enter on an empty list: prepare the built-in corpus, train the tiny preset detached, then stop it."""
    # 60 steps: a loss every 2 steps, and still running when we stop it
    monkeypatch.setenv("WORKBENCH_QUICKSTART_STEPS", "60")
    run = tmp_path / "runs" / "quickstart"

    async def body(pilot, app):
        screen = app.screen
        await pilot.press("enter")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "QuickStartScreen", what="quick start")
        panel = app.screen.query_one(PreparePanel)
        # preparation streams per-stage bars, then the engine starts and its dashboard opens
        await wait_for(pilot, lambda: type(app.screen).__name__ == "DashboardScreen", timeout=120,
                       what="the dashboard of the new run")
        assert engine_calls.is_prepared(tmp_path / "data" / "builtin")
        assert set(panel._bars) == {"read", "tokenizer", "encode"}
        assert all(bar.percentage == 1.0 for bar, _count in panel._bars.values())
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen, what="the runs screen")
        await wait_for(pilot, lambda: (screen.runs.get(str(run)) or {}).get("train_loss") is not None,
                       timeout=60, what="a training loss in the list")
        row = table_rows(screen)[0]
        assert row[0] == "quickstart" and row[1] == "running" and float(row[3]) > 0
        await pilot.press("x")  # stop: the engine saves a checkpoint and ends
        await wait_for(pilot, lambda: screen.runs[str(run)]["state"] == "stopped", timeout=60, what="stopped")
        latest = RunDir.at(run).latest_checkpoint()  # the stop saved where it was
        stopped_at = json.loads((latest / "state.json").read_text())["step"]
        assert stopped_at >= screen.runs[str(run)]["step"]

    run_app(tmp_path, body)


def test_engine_killed_while_watching_turns_crashed(tmp_path, tiny_data):
    run = tmp_path / "runs" / "victim"
    cfg = from_dict(tiny_raw(tiny_data, train={"max_steps": 100000}))

    async def body(pilot, app):
        screen = app.screen
        engine_calls.start_training(run, tiny_data, to_toml(cfg))
        await wait_for(pilot, lambda: (screen.runs.get(str(run)) or {}).get("state") == "running",
                       timeout=30, what="running")
        os.kill(client.engine_pid(run), signal.SIGKILL)
        await wait_for(pilot, lambda: screen.runs[str(run)]["state"] == "crashed", timeout=5,
                       what="crashed within seconds")
        # notify() reaches the app as a message: give it a moment (asserting at once was flaky under load)
        await wait_for(pilot, lambda: any("Run crashed" in n for n in notifications(app)), timeout=5,
                       what="the crash notification")
        assert table_rows(screen)[0][1] == "crashed"

    run_app(tmp_path, body)

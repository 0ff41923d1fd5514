"""The checkpoints screen against real runs of a tiny CPU model: the list, resume from an older
checkpoint, fork a new run from one (and a fork onto data with another tokenizer refused in a
notification), delete with confirmation; and resuming a finished run for more steps from the runs list."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
from engine_helpers import tiny_raw, workbench, write_toml
from textual.widgets import DataTable, Input
from workbench_pilot import notifications, run_app, table_rows, wait_for

from workbench.engine.process import client
from workbench.engine.rundir import RunDir
from workbench.screens.checkpoints import CheckpointsScreen, ForkScreen


@pytest.fixture(autouse=True)
def one_thread_engines(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_data) -> Path:
    """A finished 20-step run with checkpoints at steps 10 and 20 (trained once, copied per test)."""
    root = tmp_path_factory.mktemp("trained")
    config = write_toml(root / "tiny.toml", tiny_raw(tiny_data))
    done = workbench("train", config, "--run", root / "runs" / "base", cwd=root)
    assert done.returncode == 0, done.stderr
    return root / "runs" / "base"


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    copy = tmp_path / "runs" / "base"
    shutil.copytree(trained_run, copy)
    return copy


async def open_checkpoints(pilot, app) -> CheckpointsScreen:
    await wait_for(pilot, lambda: len(app.screen.runs) == 1, what="the run in the list")
    await pilot.press("c")
    await wait_for(pilot, lambda: isinstance(app.screen, CheckpointsScreen) and app.screen.rows,
                   what="the checkpoints")
    return app.screen


def select_row(screen, name: str) -> None:
    table = screen.query_one(DataTable)
    table.move_cursor(row=table.get_row_index(name))


def messages(run: Path, kind: str = "log") -> list[str]:
    lines = (run / "events.jsonl").read_text().splitlines()
    return [e.get("message", "") for e in map(json.loads, lines) if e["type"] == kind]


def test_lists_checkpoints_with_their_metrics(run, tmp_path):
    async def body(pilot, app):
        screen = await open_checkpoints(pilot, app)
        rows = table_rows(screen)
        assert [r[0].split()[0] for r in rows] == ["step_000010", "step_000020"]
        assert "latest" in rows[1][0]
        assert rows[1][1] == "20" and float(rows[1][3]) > 0 and float(rows[1][4]) > 0  # val loss, bpb
        assert rows[1][5].endswith("KiB") or rows[1][5].endswith("MiB")
        titles = {c.title for c in app.get_system_commands(screen)}
        assert {"Resume here", "Fork", "Delete", "Back"} <= titles

    run_app(tmp_path, body)


def test_resume_from_an_older_checkpoint(run, tmp_path):
    async def body(pilot, app):
        screen = await open_checkpoints(pilot, app)
        select_row(screen, "step_000010")
        await pilot.press("r")
        # the run trains again from step 10, in a detached engine, and the dashboard opens
        await wait_for(pilot, lambda: type(app.screen).__name__ == "DashboardScreen", timeout=60, what="dashboard")
        await wait_for(pilot, lambda: client.run_state(run) == "finished" and "resumed from checkpoints/step_000010"
                       in " ".join(messages(run)), timeout=60, what="the resumed run finishing")

    run_app(tmp_path, body)
    assert RunDir.at(run).latest_checkpoint().name == "step_000020"


def test_fork_starts_a_new_run_from_the_weights(run, tmp_path, tiny_data):
    fork = tmp_path / "runs" / "base-ft1"

    async def body(pilot, app):
        screen = await open_checkpoints(pilot, app)
        select_row(screen, "step_000010")
        await pilot.press("f")
        await wait_for(pilot, lambda: isinstance(app.screen, ForkScreen), what="the fork dialog")
        dialog = app.screen
        assert dialog.query_one("#fork-name", Input).value == "base-ft1"
        assert dialog.query_one("#fork-lr", Input).value == "0.0003"  # a tenth of the source run's lr
        dialog.query_one("#fork-steps", Input).value = "6"
        dialog.query_one("#fork-warmup", Input).value = "2"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "DashboardScreen", timeout=60, what="dashboard")
        await wait_for(pilot, lambda: client.run_state(fork) == "finished", timeout=60, what="the fork finishing")

    run_app(tmp_path, body)
    assert any("initialised weights from" in m and "step_000010" in m for m in messages(fork))
    cfg = tomllib.loads((fork / "config.toml").read_text())
    assert cfg["optim"]["lr"] == pytest.approx(3e-4) and cfg["train"]["max_steps"] == 6
    assert (fork / "checkpoints" / "step_000006").is_dir()
    assert RunDir.at(run).latest_checkpoint().name == "step_000020"  # the source run is untouched


def test_fork_onto_another_tokenizer_is_refused_in_a_notification(run, tmp_path, other_tokenizer_data):
    async def body(pilot, app):
        await open_checkpoints(pilot, app)
        await pilot.press("f")
        await wait_for(pilot, lambda: isinstance(app.screen, ForkScreen), what="the fork dialog")
        app.screen.query_one("#fork-data", Input).value = str(other_tokenizer_data)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: any("different tokenizer" in n for n in notifications(app)), timeout=60,
                       what="the refusal")
        assert isinstance(app.screen, ForkScreen)

    run_app(tmp_path, body)
    assert not (tmp_path / "runs" / "base-ft1").exists()


def test_delete_asks_and_moves_latest(run, tmp_path):
    async def body(pilot, app):
        screen = await open_checkpoints(pilot, app)
        select_row(screen, "step_000020")
        await pilot.press("d")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", what="the question")
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen, what="back")
        assert (run / "checkpoints" / "step_000020").is_dir()
        await pilot.press("d")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", what="the question")
        await pilot.press("y")
        await wait_for(pilot, lambda: [r["name"] for r in screen.rows] == ["step_000010"], what="one left")
        assert "latest" in table_rows(screen)[0][0]

    run_app(tmp_path, body)
    assert RunDir.at(run).latest_checkpoint().name == "step_000010"


def test_resume_a_finished_run_for_more_steps(run, tmp_path):
    async def body(pilot, app):
        await wait_for(pilot, lambda: len(app.screen.runs) == 1, what="the run")
        await pilot.press("r")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "AskScreen", what="how many steps")
        ask = app.screen.query_one(Input)
        assert ask.value == "40"
        ask.value = "24"
        await pilot.press("enter")
        await wait_for(pilot, lambda: client.run_state(run) == "finished" and RunDir.at(run).latest_checkpoint().name
                       == "step_000024", timeout=60, what="the run extended to step 24")

    run_app(tmp_path, body)


def test_sample_from_a_checkpoint_in_a_child_process(run):
    """engine_calls.sample: `workbench sample --json` in a child process (the TUI never loads torch)."""
    from workbench import engine_calls

    samples = engine_calls.sample(run, "The", "step_000010", n=2, max_tokens=8, seed=3)
    assert len(samples) == 2 and all(isinstance(s["text"], str) for s in samples)
    assert samples == engine_calls.sample(run, "The", "step_000010", n=2, max_tokens=8, seed=3)  # seeded
    with pytest.raises(engine_calls.EngineCallError, match="step_000999"):
        engine_calls.sample(run, "The", "step_000999")

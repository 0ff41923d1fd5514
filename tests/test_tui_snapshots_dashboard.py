"""Snapshots (pytest-textual-snapshot) of the dashboard, rating and leaderboard screens at 80x24
and 120x40, from a fixed run directory (tui_fixtures), so every frame is the same each time.

Update after an intended change with: pytest tests/test_tui_snapshots_dashboard.py --snapshot-update
"""

from __future__ import annotations

import os
import time

import pytest
from tui_fixtures import fake_generate, make_demo_run

from workbench.screens.dashboard import DashboardScreen
from workbench.screens.leaderboard import LeaderboardScreen
from workbench.screens.rating import RatingScreen
from workbench.screens.standalone import ScreenApp

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


@pytest.fixture(autouse=True)
def utc_clock(monkeypatch):
    """Log lines show local times: pin the zone so the snapshots do not depend on the machine's."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def until(pilot, condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the screen never got ready"
        await pilot.pause(0.05)
    await pilot.pause(0.3)  # let the last refresh land


@pytest.mark.parametrize("size", SIZES)
def test_dashboard(snap_compare, tmp_path, size):
    run = make_demo_run(tmp_path)

    async def replayed(pilot):
        screen = pilot.app.screen
        await until(pilot, lambda: screen.view is not None and screen.view.n_steps == 300
                    and screen.state == "finished")

    assert snap_compare(ScreenApp(lambda: DashboardScreen(run)), terminal_size=size, run_before=replayed)


def test_dashboard_tokens_axis_and_samples(snap_compare, tmp_path):
    run = make_demo_run(tmp_path)

    async def toggled(pilot):
        screen = pilot.app.screen
        await until(pilot, lambda: screen.view is not None and screen.view.n_steps == 300)
        await pilot.press("t", "l")
        await pilot.pause(0.3)

    assert snap_compare(ScreenApp(lambda: DashboardScreen(run)), terminal_size=(80, 24), run_before=toggled)


@pytest.mark.parametrize("size", SIZES)
def test_rating(snap_compare, tmp_path, size):
    """80x24: a blind pair waiting for the vote. 120x40: the same pair after `1`, names revealed."""
    run = make_demo_run(tmp_path)

    async def pair_shown(pilot):
        screen = pilot.app.screen
        await pilot.press(*"The list", "enter")
        await until(pilot, lambda: screen.round is not None and not screen.generating)
        if size == (120, 40):
            await pilot.press("1")
            await until(pilot, lambda: screen.votes == 21)

    app = ScreenApp(lambda: RatingScreen(run, generator=fake_generate, seed=1))
    assert snap_compare(app, terminal_size=size, run_before=pair_shown)


@pytest.mark.parametrize("size", SIZES)
def test_leaderboard(snap_compare, tmp_path, size):
    run = make_demo_run(tmp_path)

    async def fitted(pilot):
        await until(pilot, lambda: len(pilot.app.screen.standings) == 3)

    assert snap_compare(ScreenApp(lambda: LeaderboardScreen(run)), terminal_size=size, run_before=fitted)


def test_fixture_is_deterministic(tmp_path):
    """The snapshots are only as stable as their fixture: two builds are byte for byte the same."""
    a, b = make_demo_run(tmp_path / "a"), make_demo_run(tmp_path / "b")
    for name in ("events.jsonl", "ratings.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert os.path.getsize(a / "events.jsonl") > 10_000

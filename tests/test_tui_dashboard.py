"""Dashboard Pilot tests: replaying a run's history, following a growing events.jsonl, turning
`crashed` when the engine goes, and, against a real engine on a tiny CPU model, live updates,
pause/resume, save and stop with confirmation."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import time
from pathlib import Path

import pytest
from engine_helpers import tiny_raw, workbench, write_toml
from event_fixtures import complete, fields
from textual.widgets import ContentSwitcher, Label, RichLog, Sparkline
from tui_fixtures import make_demo_run
from workbench_pilot import wait_for

from workbench.engine.events import EventWriter
from workbench.screens.dashboard import DashboardScreen
from workbench.screens.standalone import ScreenApp
from workbench.widgets.plots import LossPlot
from workbench.widgets.system import GpuRows


def status_text(screen: DashboardScreen) -> str:
    return str(screen.query_one("#status", Label).render())


def log_text(screen: DashboardScreen) -> str:
    return "\n".join(strip.text for strip in screen.query_one("#log", RichLog).lines)


def run_dashboard(run: Path, body, size=(80, 24)) -> None:
    async def main():
        app = ScreenApp(lambda: DashboardScreen(run))
        async with app.run_test(size=size) as pilot:
            screen = app.screen
            assert isinstance(screen, DashboardScreen)
            await body(pilot, app, screen)
    asyncio.run(main())


# ---------------------------------------------------------------- from a fixed history

def test_replays_a_finished_run(tmp_path):
    run = make_demo_run(tmp_path)

    async def body(pilot, app, screen):
        await wait_for(pilot, lambda: screen.view is not None and screen.view.n_steps == 300, what="replay")
        await pilot.pause(0.2)
        text = status_text(screen)
        assert "finished" in text and "step 300/300" in text
        assert screen.query_one("#stat-loss").query_one(".stat-value", Label).render().plain == "3.1732"
        assert screen.query_one("#stat-val").query_one(".stat-value", Label).render().plain == "3.3033"
        assert "checkpoint step_000300 saved" in log_text(screen)
        assert len(screen.query(GpuRows)) == 1  # the fixture has one GPU
        plot = screen.query_one(LossPlot)
        assert len(plot.view.steps) == 300 and not plot.by_tokens
        await pilot.press("t")
        assert plot.by_tokens and plot.border_title == "loss · tokens"
        await pilot.press("l")
        assert screen.query_one("#bottom", ContentSwitcher).current == "samples"
        # a finished run has no engine: control keys say so in a notification, not a traceback
        await pilot.press("s")
        await wait_for(pilot, lambda: any("no engine" in n.message for n in app._notifications),
                       what="no-engine notification")
        # stop on a finished run: no "Stop training?" question about a run that is not training
        await pilot.press("x")
        await wait_for(pilot, lambda: any(n.message.startswith("stop: no engine") for n in app._notifications),
                       what="stop: no-engine notification")
        assert app.screen is screen

    run_dashboard(run, body)


def test_log_lines_wrap_inside_the_panel_at_80_columns(tmp_path):
    """Long log lines wrap at the panel's width: none hides under the scrollbar or scrolls sideways."""
    run = tmp_path / "wordy"
    run.mkdir()
    w = EventWriter(run / "events.jsonl")
    w.emit("state", state="finished")
    for i in range(12):
        w.emit("log", level="info", message=f"model: 932k parameters, 6.37MFLOPs/token, ~107MB to train; "
                                            f"data: 159k train / 8.46k val tokens ({i})")
    w.close()

    async def body(pilot, app, screen):
        log = screen.query_one("#log", RichLog)
        await wait_for(pilot, lambda: len(log.lines) >= 24, what="log lines")
        await pilot.pause(0.2)
        assert max(strip.cell_length for strip in log.lines) <= log.scrollable_content_region.width
        assert not log.show_horizontal_scrollbar
        assert "val tokens (11)" in log_text(screen)

    run_dashboard(run, body)


def test_resume_from_an_older_checkpoint_forgets_the_undone_evals(tmp_path):
    """Steps going back (resume at step 50 after evals at 50 and 100) take the later evals and checkpoints
    with them: val shows step 50's, not a value from steps that no longer happened."""
    run = tmp_path / "rewound"
    run.mkdir()
    w = EventWriter(run / "events.jsonl")
    w.emit("state", **fields("state", state="running"))
    for step in range(1, 101):
        w.emit("step", **fields("step", step=step, max_steps=150, loss=6 - step / 50, tokens=step * 100))
        if step in (50, 100):
            w.emit("eval", **fields("eval", step=step, val_loss=7 - step / 50, val_bpb=3 - step / 100))
            w.emit("checkpoint", **fields("checkpoint", step=step))
    w.emit("state", state="stopped")
    w.emit("state", **fields("state", state="running"))  # resumed from step_000050
    for step in range(51, 56):
        w.emit("step", **fields("step", step=step, max_steps=150, loss=5.5, tokens=step * 100))
    w.emit("state", state="stopped")
    w.close()

    async def body(pilot, app, screen):
        await wait_for(pilot, lambda: screen.view is not None and (screen.view.latest or {}).get("step") == 55,
                       what="replay")
        await pilot.pause(0.2)
        assert screen.view.n_steps == 55 and list(screen.view.eval_steps) == [50]
        assert screen.query_one("#stat-val").query_one(".stat-value", Label).render().plain == "6.0000"
        assert [c["step"] for c in screen.view.checkpoints] == [50]
        assert "step_000050" in str(screen.query_one("#ckpt", Label).render())

    run_dashboard(run, body)


def test_cpu_and_ram_sparklines_are_on_a_0_to_100_scale(tmp_path):
    """A steady 100 % CPU is a full bar and 10 % RAM a low one (a min-max sparkline drew both flat at the bottom)."""
    run = tmp_path / "busy"
    run.mkdir()
    w = EventWriter(run / "events.jsonl")
    w.emit("state", state="finished")
    for _ in range(30):
        w.emit("system", **fields("system", cpu_percent=100.0, ram_used_bytes=1 << 30, ram_total_bytes=10 << 30))
    w.close()

    async def body(pilot, app, screen):
        await wait_for(pilot, lambda: screen.view is not None and len(screen.view.cpu) == 30, what="replay")
        await pilot.pause(0.2)
        cpu = str(screen.query_one("#cpu").query_one(Sparkline).render())
        ram = str(screen.query_one("#ram").query_one(Sparkline).render())
        assert cpu and set(cpu) == {"█"}
        assert ram and set(ram) == {"▂"}

    run_dashboard(run, body)


def test_the_cpu_panel_shows_the_machine_share_never_above_100(tmp_path):
    """The CPU row is the system event's cpu_percent (the whole machine, 0-100), never the engine
    process's own share, which exceeds 100 on several cores: also for a v1 run's events."""
    run = tmp_path / "cores"
    run.mkdir()
    v1 = {"v": 1, "t": 1.0, "type": "system", "cpu_percent": 387.5, "machine_cpu_percent": 48.0, "cpu_count": 8,
          "rss_bytes": 1 << 30, "ram_used_bytes": 1 << 30, "ram_total_bytes": 10 << 30, "gpus": [],
          "engine_gpu": None}  # as the previous release wrote it: cpu_percent was the process's
    with open(run / "events.jsonl", "w") as f:
        f.write(json.dumps(v1) + "\n")
    shown = []

    async def body(pilot, app, screen):
        def cpu() -> str:
            return screen.query_one("#cpu").query_one(".stat-value", Label).render().plain

        await wait_for(pilot, lambda: cpu() != "n/a", what="the v1 system event")
        shown.append(cpu())
        w = EventWriter(run / "events.jsonl")
        w.emit("system", **fields("system", cpu_percent=100.0, process_cpu_percent=790.0, cpu_count=8))
        w.close()
        await wait_for(pilot, lambda: cpu() != shown[-1], timeout=10, what="the v2 system event")
        shown.append(cpu())
        assert max(screen.view.cpu) <= 100

    run_dashboard(run, body)
    assert shown == ["48%", "100%"]


def test_long_history_is_downsampled(tmp_path):
    """A 50k-step history replays quickly and the plot gets a few hundred points, not 50k."""
    run = tmp_path / "long"
    run.mkdir()
    w = EventWriter(run / "events.jsonl")
    w.emit("state", **fields("state", state="running"))
    for step in range(1, 50_001):
        w.emit("step", step=step, max_steps=50_000, loss=3 + 1 / step, lr=1e-3, grad_norm=1.0, tokens=step * 64,
               tokens_per_s=1e4, mfu=None, eta_s=1.0, elapsed_s=step * 0.01)
    w.emit("state", state="finished")
    w.close()

    async def body(pilot, app, screen):
        started = time.monotonic()
        await wait_for(pilot, lambda: screen.view is not None and screen.view.n_steps == 50_000, what="replay")
        assert time.monotonic() - started < 10
        assert len(screen.query_one(LossPlot).view.steps) <= 400
        assert "step 50000/50000" in status_text(screen)

    run_dashboard(run, body)


# ---------------------------------------------------------------- following a live file

def test_chunked_reads_equal_one_whole_read(tmp_path):
    """The dashboard replays in bounded chunks (read_events max_bytes): same events, same end offset."""
    from workbench.engine.events import read_events

    w = EventWriter(tmp_path / "events.jsonl")
    for i in range(300):
        w.emit("log", level="info", message="x" * (i * 7))  # some lines longer than a chunk
    w.close()
    whole, end = read_events(tmp_path / "events.jsonl")
    got, offset = [], 0
    while True:
        events, new = read_events(tmp_path / "events.jsonl", offset, max_bytes=900)
        if new == offset:
            break
        got, offset = got + events, new
    assert got == whole and offset == end


def hold_engine_lock(run: Path) -> int:
    """Take the run's engine lock as an engine does (flock + pid file): the run counts as alive."""
    fd = os.open(run / "engine.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (run / "engine.pid").write_text(f"{os.getpid()}\n")
    return fd


def test_follows_appended_events_and_turns_crashed_when_the_engine_goes(tmp_path):
    run = tmp_path / "growing"
    run.mkdir()
    (run / "config.toml").write_text("[train]\nmax_steps = 100\n")
    lock = hold_engine_lock(run)
    w = EventWriter(run / "events.jsonl")
    w.emit("state", **fields("state", state="running"))
    for step in range(1, 11):
        w.emit("step", **fields("step", step=step, max_steps=100, loss=5.0 - step * 0.1, lr=1e-3, tokens=step * 100))

    async def body(pilot, app, screen):
        await wait_for(pilot, lambda: screen.view is not None and screen.view.n_steps == 10, what="replay")
        assert "running" in status_text(screen)
        for step in range(11, 21):
            w.emit("step", **fields("step", step=step, max_steps=100, loss=5.0 - step * 0.1, lr=1e-3,
                                    tokens=step * 100))
        await wait_for(pilot, lambda: screen.view.n_steps == 20, timeout=10, what="appended steps")
        # a torn line (a writer mid-append) is left alone until it is complete
        line = json.dumps(complete({"type": "step", "step": 21, "max_steps": 100, "loss": 2.9, "tokens": 2100}))
        with open(run / "events.jsonl", "a") as f:
            f.write(line[:40])
            f.flush()
            await pilot.pause(1.2)
            assert screen.view.n_steps == 20
            f.write(line[40:] + "\n")
        await wait_for(pilot, lambda: screen.view.n_steps == 21, timeout=10, what="completed line")
        w.emit("error", message="CUDA out of memory", traceback="Traceback ...")
        await wait_for(pilot, lambda: any("out of memory" in n.message for n in app._notifications),
                       timeout=10, what="error notification")
        assert "Traceback" not in log_text(screen)
        # the engine dies without a last word: within seconds the run is crashed
        os.close(lock)
        t0 = time.monotonic()
        await wait_for(pilot, lambda: screen.state == "crashed", timeout=10, what="crashed")
        assert time.monotonic() - t0 < 5  # polled every second; slack for a busy 2-core CI machine
        assert "crashed" in status_text(screen)
        # notify() reaches the app as a message: give it a moment
        await wait_for(pilot, lambda: any("crashed" in n.message for n in app._notifications),
                       timeout=5, what="crash notification")

    run_dashboard(run, body)
    w.close()


# ---------------------------------------------------------------- a real engine

@pytest.fixture(scope="module")
def live_run(tiny_data, tmp_path_factory):
    """A detached engine training a tiny CPU model for longer than the tests need (stopped after)."""
    root = tmp_path_factory.mktemp("live")
    config = write_toml(root / "tiny.toml", tiny_raw(tiny_data, train={"max_steps": 100_000},
                                                     eval={"interval": 200, "sample_interval": 0},
                                                     checkpoint={"interval": 500, "keep_last": 2}))
    run = root / "runs" / "live"
    done = workbench("train", config, "--run", run, "--detach", timeout=180)
    assert done.returncode == 0, done.stderr
    yield run
    workbench("stop", run, timeout=60)
    pid = (run / "engine.pid").read_text().strip() if (run / "engine.pid").exists() else None
    if pid:  # never leave an engine behind
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_live_updates_pause_resume_save_and_stop(live_run):
    async def body(pilot, app, screen):
        await wait_for(pilot, lambda: screen.state == "running" and screen.view and screen.view.n_steps > 0,
                       timeout=60, what="a running engine with steps")
        first = screen.view.latest["step"]
        await wait_for(pilot, lambda: screen.view.latest["step"] > first + 5, timeout=20, what="live steps")
        assert f"step {screen.view.latest['step']}" in status_text(screen) or screen.view.latest["step"] > first

        await pilot.press("p")
        await wait_for(pilot, lambda: screen.state == "paused", timeout=20, what="paused")
        await pilot.pause(1.0)
        held = screen.view.latest["step"]
        await pilot.pause(1.5)
        assert screen.view.latest["step"] == held, "a paused engine takes no steps"
        assert "paused" in status_text(screen)
        assert str(screen.query_one("#eta").render()) == "ETA on hold"  # not a frozen countdown

        await pilot.press("p")
        await wait_for(pilot, lambda: screen.state == "running", timeout=20, what="running again")
        await wait_for(pilot, lambda: screen.view.latest["step"] > held, timeout=20, what="steps after resume")

        saved, evals, samples = len(screen.view.checkpoints), len(screen.view.val_loss), len(screen.view.samples)
        await pilot.press("s", "e", "g")  # save, eval now, sample now
        await wait_for(pilot, lambda: len(screen.view.checkpoints) > saved, timeout=30, what="checkpoint event")
        await wait_for(pilot, lambda: len(screen.view.val_loss) > evals, timeout=30, what="eval event")
        await wait_for(pilot, lambda: len(screen.view.samples) > samples, timeout=30, what="sample event")
        await pilot.press("l")
        assert f"step {screen.view.samples[-1]['step']}" in str(screen.query_one("#samples-text").render())

        await pilot.press("x")  # stop asks first; "n" keeps training
        await wait_for(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", timeout=5, what="confirm")
        await pilot.press("n")
        await pilot.pause(1.5)
        assert screen.state == "running"
        await pilot.press("x")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", timeout=5, what="confirm")
        await pilot.press("y")
        await wait_for(pilot, lambda: screen.state == "stopped", timeout=60, what="stopped")
        assert "stopped" in status_text(screen)

    run_dashboard(live_run, body)
    from workbench.engine.process import client

    assert client.run_state(live_run) == "stopped"
    assert (live_run / "checkpoints" / "latest").exists()


def test_leaving_the_dashboard_never_stops_training_and_kill_9_shows_crashed(live_run):
    """Resume the stopped run, leave the app (training goes on), come back, kill -9: crashed."""
    done = workbench("train", "--resume", live_run, "--detach", timeout=180)
    assert done.returncode == 0, done.stderr

    async def leave(pilot, app, screen):
        await wait_for(pilot, lambda: screen.state == "running", timeout=60, what="running")
        await pilot.press("escape")  # leaves the standalone app

    run_dashboard(live_run, leave)
    from workbench.engine.process import client

    step_then = client.run_summary(live_run)["step"]
    time.sleep(1.5)
    assert client.run_state(live_run) == "running"
    assert client.run_summary(live_run)["step"] > step_then

    async def crash(pilot, app, screen):
        await wait_for(pilot, lambda: screen.state == "running", timeout=30, what="running")
        os.kill(int((live_run / "engine.pid").read_text()), signal.SIGKILL)
        await wait_for(pilot, lambda: screen.state == "crashed", timeout=10, what="crashed")
        await wait_for(pilot, lambda: any("crashed" in n.message for n in app._notifications), timeout=10,
                       what="the crash notification")

    run_dashboard(live_run, crash)

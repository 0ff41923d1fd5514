"""The new-run screen: live estimates and validation as you type; preparation with progress bars and
its report; start in a detached engine (real, tiny CPU model); user errors as notifications."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import pytest
from rich.text import Text
from textual.widgets import Input, Select, Static
from workbench_pilot import notifications, run_app, wait_for, write_corpus, write_events

from workbench.engine.estimates import Shape, param_count
from workbench.engine.formatting import count as human
from workbench.engine.process import client
from workbench.screens.new_run import NewRunScreen, PreparePanel


@pytest.fixture(autouse=True)
def one_thread_engines(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def text_of(screen, selector: str) -> str:
    """What a Static shows, as plain text (a rich Table included)."""
    from rich.console import Console

    content = screen.query_one(selector, Static).content
    console = Console(width=60, record=True, file=io.StringIO())
    console.print(content if not isinstance(content, str) else Text.from_markup(content))
    return console.export_text()


async def open_new_run(pilot, app) -> NewRunScreen:
    await pilot.press("n")
    await wait_for(pilot, lambda: isinstance(app.screen, NewRunScreen), what="the new-run screen")
    return app.screen


def set_value(screen, wid: str, value: str) -> None:
    screen.query_one(f"#{wid}", Input).value = value


def test_estimates_follow_every_change(tmp_path):
    async def body(pilot, app):
        screen = await open_new_run(pilot, app)
        await wait_for(pilot, lambda: screen.hardware is not None, what="hardware detection")
        tiny = param_count(Shape(4, 4, 128, 128, 4096))
        assert human(tiny) in text_of(screen, "#estimates")
        assert "time" in text_of(screen, "#estimates") and "tok/s" in text_of(screen, "#estimates")
        # typing a new width: the numbers follow and the preset turns custom
        screen.query_one("#model-d_model", Input).focus()
        await pilot.press("end", "backspace", "backspace", "backspace", *"256")
        await wait_for(pilot, lambda: human(param_count(Shape(4, 4, 256, 128, 4096))) in text_of(screen, "#estimates"),
                       what="estimates for d_model 256")
        assert screen.query_one("#preset", Select).value == "custom"
        # an impossible shape is named at once, by the engine's own validation
        set_value(screen, "model-d_model", "130")
        await wait_for(pilot, lambda: "divisible" in text_of(screen, "#new-run-error"), what="the shape error")
        # a preset fills the form
        screen.query_one("#preset", Select).value = "small"
        await wait_for(pilot, lambda: screen.query_one("#model-d_model", Input).value == "512", what="small preset")
        await wait_for(pilot, lambda: not text_of(screen, "#new-run-error").strip(), what="the error cleared")
        assert screen.query_one("#run-name", Input).value == "small-1"
        # ctrl+s with an impossible config is a notification, never a traceback
        set_value(screen, "train-max_steps", "-5")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: any("max_steps must be positive" in n for n in notifications(app)),
                       what="the notification")
        assert isinstance(app.screen, NewRunScreen)

    run_app(tmp_path, body, size=(120, 40))


def test_prepare_then_start_a_real_run(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    data = tmp_path / "data" / "mine"
    run = tmp_path / "runs" / "mine"

    async def body(pilot, app):
        screen = await open_new_run(pilot, app)
        set_value(screen, "data-sources", str(corpus))
        set_value(screen, "data-dir", str(data))
        set_value(screen, "data-vocab", "300")
        for wid, value in {"model-n_layer": "2", "model-n_head": "2", "model-d_model": "32", "model-seq_len": "32",
                           "train-batch_size": "4", "train-max_steps": "8", "eval-interval": "4",
                           "checkpoint-interval": "4", "optim-warmup_steps": "2"}.items():
            set_value(screen, wid, value)
        screen.query_one("#train-device", Select).value = "cpu"
        name = screen.query_one("#run-name", Input)
        name.focus()
        name.value = ""
        await pilot.press(*"mine")  # typed like a user
        await pilot.press("ctrl+r")
        panel = screen.query_one(PreparePanel)
        await wait_for(pilot, lambda: "prepared" in text_of(screen, "#prepare-report"), timeout=60,
                       what="the preparation report")
        report = text_of(screen, "#prepare-report")
        assert "kept" in report and "bytes/token" in report and "vocab 300" in report
        assert set(panel._bars) == {"read", "tokenizer", "encode"}
        assert "prepared" in text_of(screen, "#data-status")  # the side panel now knows the dataset
        set_value(screen, "train-max_steps", "200000")  # hundreds of epochs: a count, not 8.5e+02
        await wait_for(pilot, lambda: "200000" == screen.value("train-max_steps"), what="steps typed")
        await pilot.pause(0.2)
        epochs = next(line for line in text_of(screen, "#data-status").splitlines() if "epochs" in line)
        assert "e+" not in epochs and epochs.split("plan = ")[1].split()[0].replace(",", "").isdigit()
        set_value(screen, "train-max_steps", "8")
        await pilot.pause(0.2)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "DashboardScreen", timeout=90,
                       what="the new run's dashboard")
        await wait_for(pilot, lambda: client.run_state(run) == "finished", timeout=90, what="the run finishing")

    run_app(tmp_path, body)
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["model"]["d_model"] == 32 and cfg["train"]["max_steps"] == 8 and cfg["train"]["device"] == "cpu"
    assert Path(cfg["data"]["path"]) == data.resolve()
    assert (run / "checkpoints" / "step_000008" / "state.json").is_file()


def test_user_errors_are_notifications(tmp_path):
    write_events(tmp_path / "runs" / "taken", [{"type": "state", "state": "finished"}])

    async def body(pilot, app):
        screen = await open_new_run(pilot, app)
        set_value(screen, "data-sources", str(tmp_path / "no-such-folder"))
        set_value(screen, "data-dir", str(tmp_path / "data" / "x"))
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: any("source not found" in n for n in notifications(app)), timeout=30,
                       what="the preparation error")
        assert "preparation failed" in text_of(screen, "#prepare-report")
        assert not (tmp_path / "data" / "x").exists()
        set_value(screen, "run-name", "taken")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: any("already exists" in n for n in notifications(app)), what="name taken")
        set_value(screen, "run-name", "bad/name")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: any("Run name" in n for n in notifications(app)), what="bad name")
        assert isinstance(app.screen, NewRunScreen)
        await pilot.press("escape")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "RunsScreen", what="back to the runs")

    run_app(tmp_path, body)

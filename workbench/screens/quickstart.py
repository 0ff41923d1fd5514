"""Quick start: prepare the built-in corpus (once) and train the tiny preset, detached.

The default action of an empty runs screen. Preparation streams its progress bars
here; the prepared corpus is kept under the data folder and reused by every later
quick start. WORKBENCH_QUICKSTART_STEPS (an integer) shortens the run: tests and
demos set it. The settings are those of `workbench quickstart` (engine/quickstart.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from workbench import engine_calls
from workbench.engine.config import to_toml
from workbench.engine.errors import WorkbenchError
from workbench.engine.quickstart import DEFAULT_STEPS, free_run_dir
from workbench.engine.quickstart import quickstart_config as engine_quickstart_config
from workbench.messages import PrepareFinished
from workbench.screens.new_run import PreparePanel

DATA_NAME = "builtin"
STEPS_ENV = "WORKBENCH_QUICKSTART_STEPS"


def quickstart_steps() -> int:
    steps = os.environ.get(STEPS_ENV, "").strip()
    if not steps:
        return DEFAULT_STEPS
    if not steps.isdigit() or int(steps) < 1:
        raise WorkbenchError(f"{STEPS_ENV} must be a positive integer, got {steps!r}")
    return int(steps)


def quickstart_config(steps: int) -> str:
    """The tiny preset as `workbench quickstart` trains it, as TOML."""
    return to_toml(engine_quickstart_config(steps))


class QuickStartScreen(ModalScreen[Path | None]):
    TITLE = "Quick start"
    HELP = """\
Prepares the built-in corpus (Python's own documentation: no download) into the
data folder, once, then trains the **tiny** preset in a detached engine on the best
device here (a GPU when there is one). **escape** cancels a preparation.
"""
    BINDINGS = [Binding("escape", "cancel", "Cancel", tooltip="Cancel the quick start")]

    def compose(self) -> ComposeResult:
        with Vertical(id="quickstart-box", classes="dialog"):
            yield Static("[b]Quick start[/b]: built-in corpus → tiny preset → best device here")
            yield PreparePanel(id="quickstart-prepare")
            yield Static("", id="quickstart-status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.data_dir = self.app.data_root / DATA_NAME
        self.run_dir = free_run_dir(self.app.runs_root / "quickstart")
        try:
            self.config_toml = quickstart_config(quickstart_steps())
        except WorkbenchError as e:
            self.app.notify(str(e), title="Quick start", severity="error", timeout=10)
            self.dismiss(None)
            return
        if engine_calls.is_prepared(self.data_dir):
            panel = self.query_one(PreparePanel)
            panel.show_report(engine_calls.read_report(self.data_dir), f"{self.data_dir} (prepared earlier)")
            self.launch()
        else:
            self.status(f"Preparing the built-in corpus into {self.data_dir}…")
            self.query_one(PreparePanel).start(
                engine_calls.prepare_args(self.data_dir))

    def status(self, text: str) -> None:
        self.query_one("#quickstart-status", Static).update(text)

    @on(PrepareFinished)
    def _prepared(self, message: PrepareFinished) -> None:
        if message.error:
            self.app.notify(message.error, title="Quick start: preparation failed", severity="error", timeout=10)
            self.status(f"[red]{message.error}[/red]\nescape to close")
            return
        self.launch()

    def launch(self) -> None:
        self.status(f"Starting [b]{self.run_dir.name}[/b] (a detached engine; loading torch takes a few seconds)…")
        self.start_engine()

    @work(thread=True, exclusive=True, group="start", exit_on_error=False)
    def start_engine(self) -> None:
        try:
            engine_calls.start_training(self.run_dir, self.data_dir, self.config_toml)
        except (engine_calls.EngineCallError, OSError) as e:
            self.app.call_from_thread(self._failed, str(e))
        else:
            self.app.call_from_thread(self.app.notify, f"{self.run_dir.name} is training", title="Quick start")
            self.app.call_from_thread(self.dismiss, self.run_dir)

    def _failed(self, error: str) -> None:
        self.app.notify(error, title="Quick start: could not start training", severity="error", timeout=10)
        self.status(f"[red]{error}[/red]\nescape to close")

    def action_cancel(self) -> None:
        self.query_one(PreparePanel).cancel()
        self.dismiss(None)

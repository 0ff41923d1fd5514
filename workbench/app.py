"""The Textual application: the runs screen first, every action on a key and in the command palette.

The app never imports torch or cupy (directly or through the engine): training,
preparation and sampling run in `python -m engine` child processes (see
engine_calls.py) and a running engine is read through its events.jsonl and
driven through workbench.engine.process.client. That keeps the first frame fast over SSH.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from workbench.screens.runs import RunsScreen

# Actions that the palette already offers (Textual's own entries) or that make no sense there.
_NOT_IN_PALETTE = {"command_palette", "app.command_palette", "quit", "app.quit", "help", "app.help"}
# Textual's own plumbing (focus moves, copy): not workbench actions, so not in help or the palette.
PLUMBING = {"app.focus_next", "app.focus_previous", "screen.copy_text", "help_quit"}


def screen_actions(screen: Screen) -> list:
    """The screen's own and the app's active bindings that name an action (not a widget's cursor keys)."""
    app = screen.app
    actives = [a for a in screen.active_bindings.values()
               if a.node in (screen, app) and a.binding.description and a.binding.action not in PLUMBING]
    return sorted(actives, key=lambda a: a.node is app)  # the screen's first (a stable sort)


HELP_KEYS = Binding.Group("Help")


class WorkbenchApp(App[None]):
    TITLE = "workbench"
    SUB_TITLE = "train small language models"
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("question_mark", "help", "Help", key_display="?", tooltip="Keys and what this screen does",
                group=HELP_KEYS),
        Binding("f1", "help", "Help", tooltip="Keys and what this screen does (also in text fields)", group=HELP_KEYS),
        Binding("q", "quit", "Quit", tooltip="Leave the workbench; training goes on"),
    ]

    def __init__(self, runs_root: str | Path = "runs", data_root: str | Path = "data") -> None:
        super().__init__()
        self.runs_root = Path(runs_root)
        self.data_root = Path(data_root)

    def get_default_screen(self) -> Screen:
        return RunsScreen()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A worker that failed is a bug: say so in a notification, keep the app running."""
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            self.log.error(f"worker {event.worker.name} failed: {error!r}")
            self.notify(f"{type(error).__name__}: {error}", title=f"Internal error in {event.worker.name}",
                        severity="error", timeout=10)

    def action_help(self) -> None:
        from workbench.screens.help import HelpScreen  # Markdown is slow to import: not before it is needed

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Every key binding of the current screen is also a palette entry (so the two never drift)."""
        titles: set[str] = set()
        for active in screen_actions(screen):
            binding = active.binding
            title = long_name(screen, binding)
            if binding.action in _NOT_IN_PALETTE or title in titles:
                continue
            titles.add(title)
            yield SystemCommand(
                title,
                f"key {self.get_key_display(binding)}" + (f" · {binding.tooltip}" if binding.tooltip else ""),
                partial(self.run_action, binding.action, active.node),
                discover=active.enabled,
            )
        yield SystemCommand("Help", "key ? · keys and what this screen does", self.action_help)
        yield from super().get_system_commands(screen)


APP_NAMES = {"command_palette": "Command palette", "app.command_palette": "Command palette"}


def long_name(screen: Screen, binding: Binding) -> str:
    """A binding's full name: the footer's short description unless the screen spells it out."""
    names = {**APP_NAMES, **getattr(screen, "LONG_NAMES", {})}
    return names.get(binding.action, binding.description)


def run_app(runs_root: str | Path = "runs", data_root: str | Path = "data") -> int:
    WorkbenchApp(runs_root, data_root).run()
    return 0

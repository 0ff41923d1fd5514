"""The runs screen: every run with its state and latest numbers; open, start, resume, stop, delete.

A thread worker polls the run folders once a second through workbench.engine.process.client (which
reads events.jsonl backwards and checks the engine's lock, so a dead engine shows
as `crashed` within a poll); the UI thread only updates table cells. Errors the
engines write, and runs that crash, become notifications.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual.widgets.data_table import CellDoesNotExist, RowDoesNotExist

from workbench import engine_calls
from workbench.engine import formatting as fmt
from workbench.engine.events import read_events
from workbench.messages import RunsChanged

REFRESH_S = 1.0
LIVE = ("starting", "running", "paused")

STATE_STYLE = {
    "running": "bold green", "starting": "green", "paused": "yellow", "finished": "cyan",
    "stopped": "dim", "crashed": "bold red", "new": "dim",
}

COLUMNS = (("name", "Run"), ("state", "State"), ("step", "Step"), ("train_loss", "Train"),
           ("val_loss", "Val"), ("tokens_per_s", "Tok/s"), ("device", "Device"), ("age", "Age"))

EMPTY_TEXT = """\
[b]No runs yet.[/b]

Press [b reverse] enter [/] for a [b]quick start[/b]: it prepares the built-in corpus
(Python's own documentation, no download) and trains the [i]tiny[/i] preset on
whatever hardware this machine has, in a detached engine you can leave running.

Or press [b reverse] n [/] to set up a new run: your data, tokenizer, model and schedule.
"""


def last_error(events_path: Path, tail_bytes: int = 1 << 16) -> str | None:
    """The message of the run's last `error` event, from the end of its events.jsonl."""
    try:
        size = events_path.stat().st_size
    except OSError:
        return None
    start = max(0, size - tail_bytes)
    events, _ = read_events(events_path, start)
    if start:
        events = events[1:]  # the first line read may be cut in half
    messages = [e["message"] for e in events if e["type"] == "error"]
    return messages[-1] if messages else None


def started(run: dict[str, Any]) -> float:
    """When a run was created (its config is written then): a stable newest-first order for the list."""
    try:
        return (Path(run["path"]) / "config.toml").stat().st_mtime
    except OSError:
        return 0.0


def short_device(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100 80GB', 'cpu (2 threads)' -> 'cpu': the list is 80 columns wide."""
    if not name:
        return "-"
    if name.startswith("cpu"):
        return "cpu"
    for vendor in ("NVIDIA ", "GeForce ", "Tesla "):
        name = name.replace(vendor, "")
    return " ".join(name.split()[:2])[:12]


def format_cells(run: dict[str, Any]) -> dict[str, Any]:
    """The table cells of one run summary (workbench.engine.process.client.run_summary)."""
    step = run.get("step")
    steps = "-" if step is None else f"{step}/{run['max_steps']}" if run.get("max_steps") else str(step)
    state = run.get("state") or "new"
    return {
        "name": run["name"],
        "state": Text(state, style=STATE_STYLE.get(state, "")),
        "step": Text(steps, justify="right"),
        "train_loss": Text(fmt.loss(run.get("train_loss"), na="-"), justify="right"),
        "val_loss": Text(fmt.loss(run.get("val_loss"), na="-"), justify="right"),
        "tokens_per_s": Text(fmt.count(run.get("tokens_per_s"), na="-"), justify="right"),
        "device": short_device(run.get("device")),
        "age": Text(fmt.duration(run.get("age_s"), parts=1, na="-"), justify="right"),
    }


class RunsScreen(Screen):
    TITLE = "Runs"
    HELP = """\
Every run under the runs folder, newest first. **State** comes from the
engine's own events and its lock: a run whose engine died shows `crashed` within
a second or two. **Train**/**Val** are the latest losses, **Tok/s** the training
throughput, **Age** the time since the run last wrote anything.

Engines run detached: quitting the workbench, or losing the SSH connection, never
stops training. **Quick start** prepares the built-in corpus once (kept under the
data folder) and trains the tiny preset on whatever hardware there is.
"""

    BINDINGS = [
        Binding("enter", "first_run", "Quick start", priority=True,
                tooltip="Prepare the built-in corpus and train the tiny preset, detached"),
        Binding("enter", "open", "Open", priority=True, tooltip="Open the run's dashboard"),
        Binding("n", "new_run", "New", tooltip="Set up a run: data, tokenizer, model, schedule"),
        Binding("g", "quickstart", "Quick start", show=False,
                tooltip="Prepare the built-in corpus and train the tiny preset, detached"),
        Binding("r", "resume", "Resume", tooltip="Continue a stopped, finished or crashed run"),
        Binding("x", "stop", "Stop", tooltip="Save a checkpoint and stop the engine"),
        Binding("c", "checkpoints", "Ckpts", tooltip="Checkpoints: resume from one, fork, delete"),
        Binding("a", "rate", "Rate", tooltip="Rate samples blind, side by side"),
        Binding("b", "leaderboard", "Board", tooltip="Checkpoints ranked by blind ratings", show=False),
        Binding("h", "chat", "Chat", tooltip="Chat with the latest checkpoint, rate replies"),
        Binding("d", "delete", "Delete", tooltip="Delete the run folder (asks first)"),
    ]

    # the footer is 80 columns wide; the palette and help spell these out
    LONG_NAMES = {"open": "Open dashboard", "new_run": "New run", "resume": "Resume run", "stop": "Stop run",
                  "checkpoints": "Checkpoints", "rate": "Rate samples", "leaderboard": "Leaderboard",
                  "chat": "Chat with the run", "delete": "Delete run"}

    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[str, dict[str, Any]] = {}  # path -> latest summary
        self._offsets: dict[Path, int] = {}  # events.jsonl -> bytes already looked at for errors
        self._poll_lock = threading.Lock()
        self._bindings_key: tuple | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="runs-body"):
            yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
            yield Static(EMPTY_TEXT, id="runs-empty")
        yield Static("", id="runs-status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        self.query_one("#runs-empty").display = False
        self.poll_runs()
        self.set_interval(REFRESH_S, self.poll_runs)

    # ---------------------------------------------------------------- polling

    @work(thread=True, exclusive=True, group="poll-runs", exit_on_error=False)
    def poll_runs(self) -> None:
        from workbench.engine.process.client import list_runs

        with self._poll_lock:  # one poll at a time: an overrunning poll must not race the next one
            runs = sorted(list_runs(self.app.runs_root), key=started, reverse=True)
            errors = {r["path"]: self._new_errors(Path(r["path"]) / "events.jsonl") for r in runs}
            for r in runs:
                r["last_error"] = last_error(Path(r["path"]) / "events.jsonl") if r["state"] == "crashed" else None
            self.app.call_from_thread(self._show_runs, runs, errors)

    def _new_errors(self, events_path: Path) -> list[dict]:
        """`error` events appended since the previous poll (none for a run seen the first time)."""
        offset = self._offsets.get(events_path)
        if offset is None:
            try:
                self._offsets[events_path] = events_path.stat().st_size
            except OSError:
                self._offsets[events_path] = 0
            return []
        events, self._offsets[events_path] = read_events(events_path, offset)
        return [e for e in events if e["type"] == "error"]

    def _show_runs(self, runs: list[dict[str, Any]], errors: dict[str, list[dict]]) -> None:
        table = self.query_one(DataTable)
        before = self.runs
        self.runs = {r["path"]: r for r in runs}
        self._notify_changes(before, errors)
        for path in list(before):
            if path not in self.runs:
                table.remove_row(path)
        for run in runs:
            cells = format_cells(run)
            if run["path"] in before:
                for key, value in cells.items():
                    table.update_cell(run["path"], key, value, update_width=True)
            else:
                table.add_row(*cells.values(), key=run["path"])
        if [str(k.value) for k in table.rows] != [r["path"] for r in runs]:
            self._reorder(table, runs)
        empty = not runs
        table.display = not empty
        self.query_one("#runs-empty").display = empty
        self._show_status()
        self._refresh_bindings_if_changed()

    def _show_status(self) -> None:
        """The line under the table: a count, or why the highlighted run crashed."""
        run = self.selected()
        status = self.query_one("#runs-status", Static)
        if run is not None and run["state"] == "crashed":
            why = run.get("last_error") or "the engine died without an error event"
            status.update(Text(f" {run['name']} crashed: {why} (details: {run['path']}/engine.log)",
                               style="red", no_wrap=True, overflow="ellipsis"))
            return
        live = sum(r["state"] in LIVE for r in self.runs.values())
        status.update(f" {len(self.runs)} run{'s' * (len(self.runs) != 1)} in {self.app.runs_root}/"
                      + (f" · {live} training" if live else ""))

    def _refresh_bindings_if_changed(self) -> None:
        """The footer depends on whether there are runs and on the highlighted run's state; redrawing
        it costs a restyle, so only when those change."""
        run = self.selected()
        key = (bool(self.runs), run and run["path"], run and run["state"])
        if key != self._bindings_key:
            self._bindings_key = key
            self.refresh_bindings()

    def _reorder(self, table: DataTable, runs: list[dict[str, Any]]) -> None:
        """Rebuild rows in the newest-first order, keeping the highlighted run highlighted."""
        selected = self.selected()
        table.clear()
        for run in runs:
            table.add_row(*format_cells(run).values(), key=run["path"])
        if selected is not None and selected["path"] in self.runs:
            table.move_cursor(row=table.get_row_index(selected["path"]))

    def _notify_changes(self, before: dict[str, dict], errors: dict[str, list[dict]]) -> None:
        """Engine errors and crashes seen while watching become notifications (never tracebacks)."""
        on_top = self.app.screen
        watched = Path(on_top.run_dir).resolve() if getattr(on_top, "announces_its_run", False) else None
        for path, run in self.runs.items():
            if Path(path).resolve() == watched:
                continue  # its dashboard is open and says it itself: once is enough
            for error in errors.get(path, []):
                self.app.notify(f"{run['name']}: {error.get('message', 'engine error')}",
                                title="Engine error", severity="error", timeout=10)
            old = before.get(path, {}).get("state")
            if old in LIVE and run["state"] == "crashed" and not errors.get(path):
                self.app.notify(f"{run['name']}: the engine died (see {run['path']}/engine.log)",
                                title="Run crashed", severity="error", timeout=10)
            elif old in LIVE and run["state"] == "finished":
                self.app.notify(f"{run['name']} finished", title="Run finished")

    @on(RunsChanged)
    def _refresh_now(self) -> None:
        self.poll_runs()

    # ---------------------------------------------------------------- selection

    def selected(self) -> dict[str, Any] | None:
        table = self.query_one(DataTable)
        if not self.runs or table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except CellDoesNotExist:
            return None
        return self.runs.get(str(key.value))

    def select_run(self, run_dir: Path) -> None:
        table = self.query_one(DataTable)
        try:
            table.move_cursor(row=table.get_row_index(str(run_dir)))
        except RowDoesNotExist:
            pass  # not listed yet: the next poll adds it

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._show_status()
        self._refresh_bindings_if_changed()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hide what cannot apply (False) and dim what does not apply to the selected run (None)."""
        if action == "first_run":  # enter quick-starts only while there is nothing to open
            return not self.runs
        run = self.selected()
        if action == "open":
            return run is not None or False
        if action in ("resume", "stop", "checkpoints", "rate", "leaderboard", "chat", "delete"):
            if run is None:
                return False  # nothing to act on: keep the footer for what can be done
            state = run["state"]
            if action == "resume":
                return state in ("stopped", "finished", "crashed")
            if action == "stop":
                return state in LIVE
            if action == "delete":
                return state not in LIVE or None
        return True

    # ---------------------------------------------------------------- actions

    def action_open(self) -> None:
        run = self.selected()
        if run is not None:
            from workbench.screens.dashboard import DashboardScreen

            self.app.push_screen(DashboardScreen(Path(run["path"])))

    def action_new_run(self) -> None:
        from workbench.screens.new_run import NewRunScreen

        self.app.push_screen(NewRunScreen(), self._after_start)

    def action_first_run(self) -> None:
        self.action_quickstart()

    def action_quickstart(self) -> None:
        from workbench.screens.quickstart import QuickStartScreen

        self.app.push_screen(QuickStartScreen(), self._after_start)

    def _after_start(self, run_dir: Path | None) -> None:
        """A screen started a run: show it, selected, and open its dashboard."""
        if run_dir is None:
            return
        self.poll_runs()
        self.call_later(self.select_run, run_dir)
        from workbench.screens.dashboard import DashboardScreen

        self.app.push_screen(DashboardScreen(Path(run_dir)))

    def action_checkpoints(self) -> None:
        run = self.selected()
        if run is not None:
            from workbench.screens.checkpoints import CheckpointsScreen

            self.app.push_screen(CheckpointsScreen(Path(run["path"])), self._after_start)

    def action_rate(self) -> None:
        run = self.selected()
        if run is not None:
            from workbench.screens.rating import RatingScreen

            self.app.push_screen(RatingScreen(Path(run["path"])))

    def action_chat(self) -> None:
        run = self.selected()
        if run is not None:
            from workbench.screens.chat import ChatScreen

            self.app.push_screen(ChatScreen(Path(run["path"])))

    def action_leaderboard(self) -> None:
        run = self.selected()
        if run is not None:
            from workbench.screens.leaderboard import LeaderboardScreen

            self.app.push_screen(LeaderboardScreen(Path(run["path"])))

    def action_resume(self) -> None:
        run = self.selected()
        if run is None:
            return
        run_dir = Path(run["path"])
        if run["state"] != "finished":
            self.app.notify(f"Resuming {run['name']}…")
            self.resume_run(run_dir)
            return
        from workbench.screens.confirm import AskScreen

        done = int(run.get("step") or 0)

        def answered(value: str | None) -> None:
            if value is None:
                return
            if not value.isdigit() or int(value) <= done:
                self.app.notify(f"Give a step number above {done}", severity="error")
                return
            self.app.notify(f"Resuming {run['name']} to step {int(value):,}…")
            self.resume_run(run_dir, int(value))

        self.app.push_screen(AskScreen(f"{run['name']} finished at step {done:,}. Train on to step:",
                                       str(max(2 * done, done + 1)), "enter starts, escape cancels",
                                       type="integer"), answered)

    @work(thread=True, group="engine-call", exit_on_error=False)
    def resume_run(self, run_dir: Path, max_steps: int | None = None) -> None:
        try:
            engine_calls.resume_training(run_dir, max_steps=max_steps)
        except engine_calls.EngineCallError as e:
            self.app.call_from_thread(self.app.notify, str(e), title=f"Cannot resume {run_dir.name}",
                                      severity="error", timeout=10)
        else:
            self.app.call_from_thread(self.app.notify, f"{run_dir.name} is training again")
        self.post_message(RunsChanged(run_dir))

    def action_stop(self) -> None:
        run = self.selected()
        if run is not None:
            self.app.notify(f"Stopping {run['name']} (saving a checkpoint first)…")
            self.stop_run(Path(run["path"]))

    @work(thread=True, group="engine-call", exit_on_error=False)
    def stop_run(self, run_dir: Path) -> None:
        try:
            engine_calls.control(run_dir, "stop")
        except engine_calls.EngineCallError as e:
            self.app.call_from_thread(self.app.notify, str(e), title=f"Cannot stop {run_dir.name}",
                                      severity="error", timeout=10)
        self.post_message(RunsChanged(run_dir))

    def action_delete(self) -> None:
        run = self.selected()
        if run is None:
            return
        from workbench.screens.confirm import ConfirmScreen

        def answered(yes: bool | None) -> None:
            if yes:
                self.delete_run(Path(run["path"]))

        self.app.push_screen(ConfirmScreen(f"Delete run [b]{run['name']}[/b]?",
                                           f"{run['path']}: config, events, every checkpoint and rating. "
                                           "This cannot be undone."), answered)

    @work(thread=True, group="engine-call", exit_on_error=False)
    def delete_run(self, run_dir: Path) -> None:
        try:
            engine_calls.delete_run(run_dir)
        except (engine_calls.EngineCallError, OSError) as e:
            self.app.call_from_thread(self.app.notify, str(e), title=f"Cannot delete {run_dir.name}",
                                      severity="error", timeout=10)
        else:
            self.app.call_from_thread(self.app.notify, f"Deleted {run_dir.name}")
        self.post_message(RunsChanged(run_dir))

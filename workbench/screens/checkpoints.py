"""A run's checkpoints: step, tokens, val loss, bits per byte, size, date; resume, fork, delete.

Rows come from each checkpoint's state.json (read in a worker). Resume moves the
run's `latest` pointer to the chosen checkpoint and continues the run there; fork
starts a new run from its weights (`--init-from`), on the same or other data,
usually with a lower learning rate: fine-tuning.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, DataTable, Footer, Header, Input, Static

from workbench import engine_calls
from workbench.engine import checkpoint
from workbench.engine import formatting as fmt
from workbench.engine.rundir import RunDir
from workbench.screens.new_run import RUN_NAME, field

COLUMNS = (("name", "Checkpoint"), ("step", "Step"), ("tokens", "Tokens"), ("val_loss", "Val loss"),
           ("val_bpb", "BPB"), ("size", "Size"), ("date", "Saved"))


def read_checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    return checkpoint.summaries(RunDir.at(run_dir))


def format_row(row: dict[str, Any]) -> list[Any]:
    tags = (" [b]latest[/b]" if row["latest"] else "") + (" [green]best[/green]" if row.get("best") else "")
    def right(text: str) -> Text:
        return Text(text, justify="right")

    return [
        Text.from_markup(row["name"] + tags),
        right(f"{row['step']:,}"),
        right(fmt.count(row["tokens"], na="-")),
        right(fmt.loss(row["val_loss"], na="-")),
        right(fmt.loss(row["val_bpb"], na="-")),
        right(fmt.nbytes(row["size"])),
        datetime.fromtimestamp(row["saved_at"]).strftime("%m-%d %H:%M"),
    ]


class CheckpointsScreen(Screen[Path | None]):
    """Dismisses with the run directory that training continues in (this one or a fork), else None."""

    TITLE = "Checkpoints"
    HELP = """\
Every complete checkpoint of the run (the engine keeps the last few plus the best
by val loss). **BPB** is validation bits per byte, comparable across tokenizers.

- **Resume** continues this run from the highlighted checkpoint, in a detached
  engine (the run must not be training).
- **Fork** starts a *new* run from the highlighted weights: fine-tuning on the same
  or other data (prepared with this run's tokenizer), usually with a lower lr.
- **Delete** removes one checkpoint; `latest` moves to the newest one left.
"""
    BINDINGS = [
        Binding("r", "resume", "Resume here", tooltip="Continue this run from the highlighted checkpoint"),
        Binding("f", "fork", "Fork", tooltip="New run from these weights (fine-tune, other data, lower lr)"),
        Binding("d", "delete", "Delete", tooltip="Delete the highlighted checkpoint (asks first)"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = []
        self._bindings_key: tuple | None = None
        self.sub_title = self.run_dir.name

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="ckpt-table", cursor_type="row", zebra_stripes=True)
        yield Static(f"No checkpoints in {self.run_dir} yet: the engine writes one every "
                     "checkpoint.interval steps, on stop, and at the end.", id="ckpt-empty")
        yield Static("", id="ckpt-status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        self.query_one("#ckpt-empty").display = False
        self.reload()
        self.set_interval(2.0, self.reload)

    @work(thread=True, exclusive=True, group="read-checkpoints", exit_on_error=False)
    def reload(self) -> None:
        rows = read_checkpoints(self.run_dir)
        from workbench.engine.process.client import run_state

        state = run_state(self.run_dir)
        self.app.call_from_thread(self._show, rows, state)

    def _show(self, rows: list[dict[str, Any]], state: str) -> None:
        table = self.query_one(DataTable)
        if [(r["name"], r["latest"], r["val_loss"]) for r in rows] != \
                [(r["name"], r["latest"], r["val_loss"]) for r in self.rows]:
            selected = self.selected()
            table.clear()
            for row in rows:
                table.add_row(*format_row(row), key=row["name"])
            if selected is not None and selected["name"] in {r["name"] for r in rows}:
                table.move_cursor(row=table.get_row_index(selected["name"]))
            elif rows:
                table.move_cursor(row=len(rows) - 1)
        self.rows = rows
        self.run_state = state
        table.display = bool(rows)
        self.query_one("#ckpt-empty").display = not rows
        total = sum(r["size"] for r in rows)
        self.query_one("#ckpt-status", Static).update(
            f" {self.run_dir.name}: {state} · {len(rows)} checkpoint{'s' * (len(rows) != 1)} · {fmt.nbytes(total)}")
        if (state, len(rows)) != self._bindings_key:  # the footer depends on these; redraw only on change
            self._bindings_key = (state, len(rows))
            self.refresh_bindings()

    def selected(self) -> dict[str, Any] | None:
        table = self.query_one(DataTable)
        if not self.rows or table.row_count == 0:
            return None
        name = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        return next((r for r in self.rows if r["name"] == name), None)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("resume", "fork", "delete"):
            if self.selected() is None:
                return None
            if action in ("resume", "delete") and getattr(self, "run_state", "") in ("starting", "running", "paused"):
                return None  # the engine is using this run's checkpoints
        return True

    # ---------------------------------------------------------------- actions

    def action_back(self) -> None:
        self.dismiss(None)

    def action_resume(self) -> None:
        row = self.selected()
        if row is None:
            return
        self.app.notify(f"Resuming {self.run_dir.name} from {row['name']}…")
        self.resume_from(row["name"])

    @work(thread=True, exclusive=True, group="engine-call", exit_on_error=False)
    def resume_from(self, name: str) -> None:
        try:
            engine_calls.resume_training(self.run_dir, checkpoint=name)
        except (engine_calls.EngineCallError, OSError) as e:
            self.app.call_from_thread(self.app.notify, str(e), title="Cannot resume", severity="error", timeout=10)
        else:
            self.app.call_from_thread(self.dismiss, self.run_dir)

    def action_fork(self) -> None:
        row = self.selected()
        if row is not None:
            self.app.push_screen(ForkScreen(self.run_dir, row), self._forked)

    def _forked(self, new_run: Path | None) -> None:
        if new_run is not None:
            self.dismiss(new_run)

    def action_delete(self) -> None:
        row = self.selected()
        if row is None:
            return
        from workbench.screens.confirm import ConfirmScreen

        detail = "It is the run's resume point; [b]latest[/b] will move to the newest checkpoint left." \
            if row["latest"] else "This cannot be undone."
        self.app.push_screen(ConfirmScreen(f"Delete checkpoint [b]{row['name']}[/b] of {self.run_dir.name}?",
                                           detail),
                             lambda yes: self.delete_checkpoint(row["name"]) if yes else None)

    @work(thread=True, group="engine-call", exit_on_error=False)
    def delete_checkpoint(self, name: str) -> None:
        try:
            engine_calls.delete_checkpoint(self.run_dir, name)
        except (engine_calls.EngineCallError, OSError) as e:
            self.app.call_from_thread(self.app.notify, str(e), title="Cannot delete", severity="error", timeout=10)
        else:
            self.app.call_from_thread(self.app.notify, f"Deleted {name}")
        self.reload()


class ForkScreen(ModalScreen[Path | None]):
    """A new run from a checkpoint's weights: name, data, learning rate, steps."""

    TITLE = "Fork"
    HELP = """\
Starts a new run from the checkpoint's weights with a fresh optimizer and step 0
(`workbench train --init-from`). The model shape is the checkpoint's; the data must
be tokenized with the same tokenizer (a dataset folder prepared from it). The new
run takes the source run's settings except what you change here.
"""
    BINDINGS = [
        Binding("ctrl+s", "start", "Start fork", tooltip="Start the new run in a detached engine"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, run_dir: Path, checkpoint: dict[str, Any]) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.checkpoint = checkpoint
        state = {}
        try:
            state = json.loads((Path(checkpoint["path"]) / "state.json").read_text())
        except (OSError, ValueError):
            pass
        self.source_cfg = state.get("config") or {}

    def compose(self) -> ComposeResult:
        optim, train = self.source_cfg.get("optim", {}), self.source_cfg.get("train", {})
        lr = optim.get("lr", 1e-3) / 10
        datasets = [str(p) for p in engine_calls.prepared_datasets(self.app.data_root)]
        data = (self.source_cfg.get("data") or {}).get("path", "")
        with Vertical(id="fork-box", classes="dialog"):
            yield Static(f"[b]Fork[/b] {self.run_dir.name} at [b]{self.checkpoint['name']}[/b] into a new run")
            yield field("New run", Input(self._default_name(), id="fork-name", compact=True))
            yield field("Dataset folder", Input(data, id="fork-data", compact=True,
                                                suggester=SuggestFromList(datasets, case_sensitive=True)))
            yield field("Learning rate", Input(f"{lr:g}", id="fork-lr", type="number", compact=True))
            yield field("Steps", Input(str(train.get("max_steps", 1000)), id="fork-steps", type="integer",
                                       compact=True))
            yield field("Warmup steps", Input(str(min(optim.get("warmup_steps", 50), 20)), id="fork-warmup",
                                              type="integer", compact=True))
            yield Static("[dim]The data must use this run's tokenizer. ctrl+s starts, escape cancels.[/dim]",
                         classes="hint")
            yield Static("", id="fork-error", classes="error-line")
            with Horizontal(classes="buttons"):
                yield Button("Start fork (ctrl+s)", id="fork-start", variant="primary")
                yield Button("Cancel", id="fork-cancel")
        yield Footer(compact=True)

    def _default_name(self) -> str:
        n = 1
        while (self.app.runs_root / f"{self.run_dir.name}-ft{n}").exists():
            n += 1
        return f"{self.run_dir.name}-ft{n}"

    def on_mount(self) -> None:
        self.query_one("#fork-name", Input).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "fork-start":
            self.action_start()
        else:
            self.action_cancel()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def value(self, wid: str) -> str:
        return self.query_one(f"#{wid}", Input).value.strip()

    def action_start(self) -> None:
        error = self.query_one("#fork-error", Static)
        name, data = self.value("fork-name"), self.value("fork-data")
        try:
            lr, steps, warmup = float(self.value("fork-lr")), int(self.value("fork-steps")), \
                int(self.value("fork-warmup"))
        except ValueError:
            error.update("✗ learning rate, steps and warmup must be numbers")
            return
        if not RUN_NAME.match(name):
            error.update("✗ run name: letters, digits, '.', '_' or '-'")
            return
        if (self.app.runs_root / name).exists():
            error.update(f"✗ {self.app.runs_root / name} already exists")
            return
        if not engine_calls.is_prepared(data):
            error.update(f"✗ {data or '(empty)'} is not a prepared dataset folder")
            return
        error.update("starting…")
        self.start_engine(self.app.runs_root / name, Path(data),
                          [f"optim.lr={lr!r}", f"train.max_steps={steps}", f"optim.warmup_steps={warmup}"])

    @work(thread=True, exclusive=True, group="start", exit_on_error=False)
    def start_engine(self, run_dir: Path, data: Path, overrides: list[str]) -> None:
        try:
            engine_calls.start_training(run_dir, data, init_from=self.checkpoint["path"], overrides=overrides)
        except (engine_calls.EngineCallError, OSError) as e:
            self.app.call_from_thread(self._failed, str(e))
        else:
            self.app.call_from_thread(self.app.notify, f"{run_dir.name} is training from {self.checkpoint['name']}",
                                      title="Fork")
            self.app.call_from_thread(self.dismiss, run_dir)

    def _failed(self, error: str) -> None:
        self.query_one("#fork-error", Static).update(f"✗ {error}")
        self.app.notify(error, title="Could not fork", severity="error", timeout=10)

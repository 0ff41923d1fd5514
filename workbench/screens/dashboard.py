"""The dashboard: one run, live. Curves, throughput, progress, system panel, log and samples.

A thread worker follows the run's events.jsonl as toolong follows a log: replay from
offset 0, then only the bytes appended since (`workbench.engine.events.EventReader`). It folds
events into a `RunHistory`, asks `workbench.engine.process.client.run_state` every second (so an engine
that dies shows `crashed` within a second or two), and hands the UI thread a small
downsampled snapshot; the UI thread only renders. Control keys send one request each
to the engine through its socket, from a worker, and report the answer as a
notification. Leaving this screen, or the app, never stops training.
"""

from __future__ import annotations

import threading
import time
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import ContentSwitcher, Footer, Label, ProgressBar, RichLog, Static
from textual.worker import get_current_worker

from workbench.engine import formatting as fmt
from workbench.engine.events import Error, EventReader
from workbench.engine.rundir import RunDir
from workbench.history import HistoryView, RunHistory, checkpoint_name
from workbench.widgets.plots import LossPlot
from workbench.widgets.stats import StatRow
from workbench.widgets.system import SystemPanel

POLL_S = 0.5          # how often to look for new bytes in events.jsonl
STATE_POLL_S = 1.0    # how often to ask whether the engine is still alive
READ_CHUNK = 4 << 20  # bytes of events.jsonl parsed at a time (bounds memory on a long replay)
LIVE = ("starting", "running", "paused")
STATE_STYLE = {"new": "dim", "starting": "yellow", "running": "green", "paused": "yellow", "finished": "blue",
               "stopped": "magenta", "crashed": "bold red"}
LOG_STYLE = {"error": "bold red", "warning": "yellow", "state": "cyan", "checkpoint": "green", "eval": "magenta"}


def engine_state(run_dir: Path) -> str | None:
    """The run's state as the engine client judges it (a dead engine is `crashed`)."""
    # no torch; imported here so a client problem is a notification, not a crash
    from workbench.engine.process import client

    return client.run_state(run_dir)


def config_max_steps(run: RunDir) -> int | None:
    try:
        with open(run.config, "rb") as f:
            value = tomllib.load(f).get("train", {}).get("max_steps")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


class DashboardScreen(Screen):
    TITLE = "Dashboard"
    HELP = """\
The live view of one run: loss curves (train, and val at each eval) over steps or tokens,
learning rate, gradient norm, throughput, MFU, progress and ETA; CPU, RAM and every GPU
over time; the engine's log and its latest samples.

Keys send requests to the run's engine; the run keeps training when you leave this
screen or quit the app. Stop asks first, then saves a checkpoint before the engine ends.
"""

    BINDINGS = [
        Binding("p", "pause", "Pause", tooltip="Pause training after the current step"),
        Binding("p", "resume", "Resume", tooltip="Resume a paused run"),
        Binding("s", "save", "Save", tooltip="Write a checkpoint now"),
        Binding("e", "eval", "Eval", tooltip="Run a validation pass now"),
        Binding("g", "sample", "Sample", tooltip="Generate a sample from the current weights now"),
        Binding("x", "stop", "Stop", tooltip="Save a checkpoint and stop training (asks first)"),
        Binding("t", "toggle_axis", "Steps/tokens", tooltip="Plot loss against steps or tokens", show=False),
        Binding("l", "toggle_pane", "Log/samples", tooltip="Show the log or the latest samples", show=False),
        Binding("r", "rate", "Rate", tooltip="Blind A/B rating of this run's checkpoints"),
        Binding("b", "leaderboard", "Board", tooltip="Checkpoints ranked by Bradley-Terry strength", show=False),
        Binding("h", "chat", "Chat", tooltip="Chat with the latest checkpoint, rate replies"),
        Binding("escape", "back", "Back", tooltip="Back to the previous screen (training goes on)", show=False),
    ]

    announces_its_run = True  # its errors, crash and end are notified here (the runs screen stays quiet)

    # the footer is 80 columns wide; the palette and help spell these out
    LONG_NAMES = {"pause": "Pause training", "resume": "Resume training", "save": "Save checkpoint",
                  "eval": "Evaluate now", "sample": "Sample now", "stop": "Stop training",
                  "toggle_axis": "Steps/tokens axis", "toggle_pane": "Log/samples pane",
                  "rate": "Rate samples", "leaderboard": "Leaderboard", "chat": "Chat with the run"}

    DEFAULT_CSS = """
    DashboardScreen { layout: vertical; }
    DashboardScreen #status-bar { height: 1; padding: 0 1; background: $boost; }
    DashboardScreen #status { width: auto; }
    DashboardScreen #progress { width: 1fr; padding-left: 1; }
    DashboardScreen #progress Bar { width: 1fr; }
    DashboardScreen #eta { width: auto; padding-left: 1; }
    DashboardScreen #middle { height: 1fr; min-height: 10; }
    DashboardScreen #loss-plot { width: 1fr; border: round $primary 50%; }
    DashboardScreen #side { width: 36; border: round $primary 50%; padding: 0 0 0 1; }
    DashboardScreen #ckpt { height: 1; }
    DashboardScreen #bottom { height: 8; border: round $primary 50%; }
    DashboardScreen #log, DashboardScreen #samples { height: 1fr; }
    DashboardScreen #log { scrollbar-gutter: stable; }  /* lines wrapped before the scrollbar came stay visible */
    DashboardScreen #samples-text { padding: 0 1; }
    DashboardScreen.-wide #side { width: 46; }
    DashboardScreen.-tall #bottom { height: 12; }
    """

    def __init__(self, run_dir: str | Path, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.run_dir = Path(run_dir)
        self.run = RunDir.at(self.run_dir)
        self.view: HistoryView | None = None
        self.state: str | None = None
        self.by_tokens = False
        self._wake = threading.Event()
        self._last_notified_state: str | None = None

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        with Horizontal(id="status-bar"):
            yield Label(self._status_text(), id="status")
            yield ProgressBar(total=1, show_eta=False, id="progress")  # a known total: never the endless animation
            yield Label("", id="eta")
        with Horizontal(id="middle"):
            yield LossPlot(id="loss-plot")
            with VerticalScroll(id="side"):
                yield StatRow("loss", id="stat-loss")
                yield StatRow("val", id="stat-val")
                yield StatRow("bpb", id="stat-bpb")
                yield StatRow("lr", id="stat-lr")
                yield StatRow("gnorm", id="stat-gnorm")
                yield StatRow("tok/s", id="stat-tps")
                yield StatRow("MFU", id="stat-mfu")
                yield SystemPanel(id="system")
                yield Label("", id="ckpt")
        with ContentSwitcher(id="bottom", initial="log"):
            # min_width=1: wrap at the panel's width (RichLog's default 78 overflows an 80-column terminal)
            yield RichLog(id="log", max_lines=1000, wrap=True, markup=False, auto_scroll=True, min_width=1)
            with VerticalScroll(id="samples"):
                yield Static("no samples yet (g asks the engine for one)", id="samples-text")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self._title_plot()
        self.query_one("#side").border_title = self.run.name
        self._title_bottom()
        self._follow()

    def on_resize(self) -> None:
        self.set_class(self.size.width >= 110, "-wide")
        self.set_class(self.size.height >= 34, "-tall")

    def on_screen_resume(self) -> None:
        if self.view is not None:
            self.query_one("#loss-plot", LossPlot).show(self.view, self.by_tokens)

    def on_unmount(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------ following the run

    @work(thread=True, exclusive=True, group="follow", exit_on_error=False)
    def _follow(self) -> None:
        worker = get_current_worker()
        history = RunHistory()
        history.max_steps = config_max_steps(self.run)  # until the engine reports it
        path = self.run.events
        reader = EventReader(path)
        catching_up = True        # replaying history: old errors are not news
        pending = True            # something to draw
        live_errors: list[Error] = []
        state: str | None = None
        next_state_check = last_draw = 0.0
        while not worker.is_cancelled:
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            # a bounded chunk at a time: a week-long history replays in steps of READ_CHUNK, not all at once
            events = reader.read(max_bytes=READ_CHUNK)
            backlog = bool(events) and reader.offset < size
            history.ingest(events)
            pending |= bool(events)
            if not catching_up:
                live_errors += [e for e in events if e["type"] == "error"]
            now = time.monotonic()
            if any(e["type"] == "state" for e in events):
                next_state_check = 0.0  # the engine says its state changed: show it now, not up to a poll later
            if now >= next_state_check:
                next_state_check = now + STATE_POLL_S
                try:
                    new_state = engine_state(self.run_dir)
                except Exception:  # no engine client, or a run dir it cannot read: trust the events
                    new_state = history.state
                pending |= new_state != state
                state = new_state
            if pending and (not backlog or now - last_draw > 1.0):
                view, new_log = history.view(), history.take_new_log()
                if worker.is_cancelled:
                    return
                try:
                    self.app.call_from_thread(self._show_view, view, state, new_log, live_errors, catching_up)
                except RuntimeError:  # the app is closing
                    return
                pending, live_errors, last_draw = False, [], now
            if not backlog:
                catching_up = False
                self._wake.wait(POLL_S)
                self._wake.clear()

    # ------------------------------------------------------------ rendering (UI thread)

    def _show_view(self, view: HistoryView, state: str | None, new_log: list[dict[str, Any]],
                   live_errors: list[Error], replay: bool) -> None:
        if not self.is_mounted:
            return
        self.view = view
        previous, self.state = self.state, state or view.state
        self.query_one("#status", Label).update(self._status_text())
        latest = view.latest
        progress = self.query_one("#progress", ProgressBar)
        max_steps = latest["max_steps"] if latest else view.max_steps
        if max_steps:
            progress.update(total=max_steps, progress=min(latest["step"] if latest else 0, max_steps))
        eta = latest["eta_s"] if latest and self.state in ("starting", "running") else None
        elapsed = latest["elapsed_s"] if latest else None
        self.query_one("#eta", Label).update(
            "ETA on hold" if self.state == "paused" else f"ETA {fmt.duration(eta)}" if eta is not None
            else f"took {fmt.duration(elapsed)}" if elapsed else "")
        if self.is_current:  # the plot is the costly part: a covered dashboard draws it on return
            self.query_one("#loss-plot", LossPlot).show(view, self.by_tokens)
        self._render_stats(view)
        self.query_one(SystemPanel).show(view)
        log = self.query_one("#log", RichLog)
        for entry in new_log[-300:] if replay else new_log:
            log.write(self._log_line(entry))
        self._render_samples(view)
        for error in live_errors:
            self.notify(error["message"], title=f"{self.run.name}: error",
                        severity="error", timeout=10)
        if previous is not None and self.state != previous and self.state != self._last_notified_state:
            self._last_notified_state = self.state
            if self.state == "crashed":
                self.notify(f"{self.run.name}: the engine stopped unexpectedly (crashed). "
                            "Resume from the last checkpoint on the runs screen.", severity="error", timeout=15)
            elif self.state in ("finished", "stopped"):  # paused/running: the status bar says it
                self.notify(f"{self.run.name}: {self.state}", timeout=4)
        self.refresh_bindings()

    def _status_text(self) -> Text:
        state = self.state or "unknown"
        text = Text.assemble(("● ", STATE_STYLE.get(state, "dim")), (state, STATE_STYLE.get(state, "dim")),
                             "  ", (self.run.name, "bold"))
        latest = self.view.latest if self.view is not None else None
        if latest:
            text.append(f"  step {latest['step']}/{latest['max_steps']}")
            if latest["tokens"]:
                text.append(f" · {fmt.count(latest['tokens'])} tok", "dim")
        return text

    def _render_stats(self, view: HistoryView) -> None:
        recent = view.recent
        latest = view.latest or {}  # no step yet: every value n/a
        q = self.query_one
        q("#stat-loss", StatRow).set(fmt.loss(latest.get("loss")), view.loss.tolist()[-120:])
        # the newest eval's numbers: the last of every eval's (a NaN bpb, an eval without one, shows n/a)
        q("#stat-val", StatRow).set(fmt.loss(_last(view.val_loss)), view.val_loss.tolist())
        q("#stat-bpb", StatRow).set(fmt.loss(_last(view.val_bpb)), view.val_bpb.tolist())
        if view.checkpoints:
            saved = f"  ({len(view.checkpoints)} saved)"
            q("#ckpt", Label).update(Text.assemble(("ckpt  ", "dim"), checkpoint_name(view.checkpoints[-1]),
                                                   (saved, "dim")))
        q("#stat-lr", StatRow).set(fmt.sci(latest.get("lr")), recent["lr"])
        q("#stat-gnorm", StatRow).set(fmt.sig(latest.get("grad_norm")), recent["grad_norm"])
        q("#stat-tps", StatRow).set(fmt.count(latest.get("tokens_per_s")), recent["tokens_per_s"])
        q("#stat-mfu", StatRow).set(fmt.format_mfu(latest.get("mfu")), [m * 100 for m in recent["mfu"]])

    def _log_line(self, entry: dict[str, Any]) -> Text:
        t = entry.get("t")
        when = datetime.fromtimestamp(t).strftime("%H:%M:%S") if isinstance(t, (int, float)) else "--:--:--"
        level = entry.get("level") or "info"
        return Text.assemble((when + " ", "dim"), (entry.get("message", ""), LOG_STYLE.get(level, "")))

    def _render_samples(self, view: HistoryView) -> None:
        if not view.samples:
            return
        text = Text()
        for sample in reversed(view.samples[-5:]):
            text.append(f"step {sample['step']}", "bold cyan")
            if sample["prompt"]:
                text.append(f"  {sample['prompt']!r}", "dim")
            text.append("\n" + sample["text"].strip() + "\n\n")
        self.query_one("#samples-text", Static).update(text)

    # ------------------------------------------------------------ actions

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # one key p: Pause while it runs, Resume while paused. Other keys stay live when no engine
        # runs, so pressing one explains why nothing happened (a notification) rather than nothing.
        if action == "pause":
            return self.state != "paused"
        if action == "resume":
            return self.state == "paused"
        return True

    def action_pause(self) -> None:
        self._control("pause")

    def action_resume(self) -> None:
        self._control("resume")

    def action_save(self) -> None:
        self._control("save")

    def action_eval(self) -> None:
        self._control("eval")

    def action_sample(self) -> None:
        self._control("sample")

    def action_stop(self) -> None:
        if self.state is not None and self.state not in LIVE:  # nothing to stop: say so, do not ask
            self._control("stop")
            return
        from workbench.screens.confirm import ConfirmScreen

        def answered(yes: bool | None) -> None:
            if yes:
                self._control("stop")

        self.app.push_screen(ConfirmScreen(f"Stop training {self.run.name}?",
                                           "A checkpoint is saved first; the run can be resumed later."), answered)

    def action_toggle_axis(self) -> None:
        self.by_tokens = not self.by_tokens
        self._title_plot()
        self.query_one("#loss-plot", LossPlot).show(by_tokens=self.by_tokens)

    def _title_plot(self) -> None:
        # t and l are not in the (full at 80 columns) footer: the panels they change say so
        plot = self.query_one("#loss-plot", LossPlot)
        plot.border_title = f"loss · {'tokens' if self.by_tokens else 'steps'}"
        plot.border_subtitle = f"t: {'steps' if self.by_tokens else 'tokens'}"

    def action_toggle_pane(self) -> None:
        switcher = self.query_one("#bottom", ContentSwitcher)
        switcher.current = "samples" if switcher.current == "log" else "log"
        self._title_bottom()

    def _title_bottom(self) -> None:
        bottom = self.query_one("#bottom", ContentSwitcher)
        showing = bottom.current or "log"
        bottom.border_title = showing
        bottom.border_subtitle = f"l: {'samples' if showing == 'log' else 'log'}"

    def action_rate(self) -> None:
        from workbench.screens.rating import RatingScreen

        self.app.push_screen(RatingScreen(self.run_dir))

    def action_leaderboard(self) -> None:
        from workbench.screens.leaderboard import LeaderboardScreen

        self.app.push_screen(LeaderboardScreen(self.run_dir))

    def action_chat(self) -> None:
        from workbench.screens.chat import ChatScreen

        self.app.push_screen(ChatScreen(self.run_dir))

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 1:
            self.app.pop_screen()
        else:  # opened on its own (workbench.screens.standalone): back means leave
            self.app.exit()

    @work(thread=True, group="control", exit_on_error=False)
    def _control(self, op: str) -> None:
        """One request to the engine; the answer (or why there was none) is a notification."""
        from workbench.engine.process import client

        try:
            reply = client.request(self.run_dir, op)
        except Exception as e:  # no engine, refused, timed out: one line for the user
            self.app.call_from_thread(self.notify, f"{op}: {e}", title=self.run.name, severity="error")
            return
        if isinstance(reply, dict) and reply.get("ok") is False:
            self.app.call_from_thread(self.notify, f"{op}: {reply.get('error', 'refused')}",
                                      title=self.run.name, severity="error")
            return
        done = {"pause": "paused", "resume": "resumed", "save": "checkpoint requested",
                "eval": "evaluation requested", "sample": "sample requested", "stop": "stopping (saving first)"}
        self.app.call_from_thread(self.notify, done.get(op, f"{op}: ok"), title=self.run.name, timeout=3)
        self._wake.set()  # look at the events right away


def _last(values) -> float | None:
    return float(values[-1]) if len(values) else None

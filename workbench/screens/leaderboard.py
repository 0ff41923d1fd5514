"""The leaderboard: a run's checkpoints ranked by Bradley-Terry strength from its blind votes.

Ratings are on the Elo scale (mean 1000) with 95% bootstrap intervals; the fit runs
in a thread worker and reruns when ratings.jsonl changes (checked every 2 s), so a
rating session in another terminal shows up here live.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Static

from workbench import ratings
from workbench.engine.rundir import RunDir

BOOTSTRAP_ROUNDS = 200
CHECK_S = 2.0


class LeaderboardScreen(Screen):
    TITLE = "Leaderboard"
    HELP = """\
Checkpoints (and decoding settings) ranked by Bradley-Terry strength, fitted to every
blind vote in the run's ratings.jsonl. Ratings are on the Elo scale, centred at 1000:
200 points apart means the stronger side wins about 3 times in 4. The interval is the
95% bootstrap range (votes resampled 200 times): overlapping intervals mean the votes
cannot yet tell the two apart. A tie counts half a win for each side; "both bad" counts
as a tie (and is shown in its own column).
"""

    BINDINGS = [
        Binding("r", "refresh", "Refresh", tooltip="Refit the ratings now"),
        Binding("n", "rate", "Rate", tooltip="Rate more pairs (blind A/B)"),
        Binding("escape", "back", "Back", tooltip="Back to the previous screen"),
    ]

    DEFAULT_CSS = """
    LeaderboardScreen { layout: vertical; }
    LeaderboardScreen #board-status { height: 1; padding: 0 1; background: $boost; }
    LeaderboardScreen #board { height: 1fr; }
    LeaderboardScreen #board-note { height: auto; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, run_dir: str | Path, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.run_dir = Path(run_dir)
        self.run = RunDir.at(self.run_dir)
        self._seen: tuple[int, int] | None = None
        self.standings: list[ratings.Standing] = []

    def compose(self) -> ComposeResult:
        yield Label(Text.assemble(("Leaderboard ", "bold"), (self.run.name, "bold"), " · reading votes…"),
                    id="board-status")
        yield DataTable(id="board", cursor_type="row", zebra_stripes=True)
        yield Static("Bradley-Terry, Elo scale (mean 1000), 95% bootstrap interval. "
                     "Ties and both-bad count half a win each.", id="board-note")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one("#board", DataTable)
        table.add_column("#", key="rank")
        table.add_column("checkpoint", key="player")
        table.add_column("rating", key="rating")
        table.add_column("95% CI", key="ci")
        table.add_column("votes", key="votes")
        table.add_column("W-T-L", key="wtl")
        table.add_column("bad", key="bad")
        self._check()
        self.set_interval(CHECK_S, self._check)

    def _check(self, force: bool = False) -> None:
        try:
            st = self.run.ratings.stat()
            seen = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            seen = (0, 0)
        if force or seen != self._seen:
            self._seen = seen
            self._fit()

    @work(thread=True, exclusive=True, group="fit", exit_on_error=False)
    def _fit(self) -> None:
        votes = ratings.read_ratings(self.run.ratings)
        try:
            table = ratings.leaderboard(votes, rounds=BOOTSTRAP_ROUNDS)
        except Exception as e:  # numbers that will not fit: a notification, not a traceback
            self.app.call_from_thread(self.notify, f"could not fit ratings: {e}", severity="error")
            return
        self.app.call_from_thread(self._show, votes, table)

    def _show(self, votes: list[dict], table: list[ratings.Standing]) -> None:
        if not self.is_mounted:
            return
        self.standings = table
        board = self.query_one("#board", DataTable)
        board.clear()
        for rank, s in enumerate(table, 1):
            interval = f"{s.low:.0f}–{s.high:.0f}" if len(votes) > 1 else "—"  # one vote: no spread to show
            board.add_row(str(rank), s.player, Text(f"{s.rating:.0f}", "bold"), interval, str(s.votes),
                          f"{s.wins}-{s.ties}-{s.losses}", str(s.both_bad), key=s.player)
        status = Text.assemble(("Leaderboard ", "bold"), (self.run.name, "bold"),
                               f" · {len(votes)} vote{'' if len(votes) == 1 else 's'} · {len(table)} contenders")
        if not votes:
            status.append("  (no votes yet: n to rate)", "dim")
        self.query_one("#board-status", Label).update(status)

    def action_refresh(self) -> None:
        self._check(force=True)

    def action_rate(self) -> None:
        from workbench.screens.rating import RatingScreen

        stack = self.app.screen_stack
        if len(stack) > 1 and isinstance(stack[-2], RatingScreen) and stack[-2].run_dir == self.run_dir:
            self.app.pop_screen()  # came here from rating: go back to it rather than stack another
        else:
            self.app.push_screen(RatingScreen(self.run_dir))

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 1:
            self.app.pop_screen()
        else:
            self.app.exit()

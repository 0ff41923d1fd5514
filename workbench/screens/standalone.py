"""Open one run's dashboard, rating or leaderboard screen directly, without the runs screen.

    python -m workbench.screens.standalone dashboard runs/tiny
    python -m workbench.screens.standalone rate runs/tiny [--prompts prompts.txt]
    python -m workbench.screens.standalone leaderboard runs/tiny

Handy over SSH for one run, and what the tests host these screens in. It loads the
app's stylesheet, so screens look as they do inside the full workbench.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

APP_CSS = Path(__file__).resolve().parent.parent / "app.tcss"


class ScreenApp(App[None]):
    """An app whose first screen is the one asked for (escape on it leaves the app)."""

    TITLE = "workbench"
    CSS_PATH = [APP_CSS] if APP_CSS.is_file() else None
    BINDINGS = [
        Binding("question_mark", "help", "Help", key_display="?", tooltip="Keys and what this screen does"),
        Binding("q", "quit", "Quit", tooltip="Leave; training goes on"),
    ]

    def __init__(self, make_screen: Callable[[], Screen]) -> None:
        super().__init__()
        self.make_screen = make_screen

    def get_default_screen(self) -> Screen:
        return self.make_screen()

    def action_help(self) -> None:
        from workbench.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))


def screen_factory(kind: str, run_dir: str, prompts: str | None = None) -> Callable[[], Screen]:
    if kind == "dashboard":
        from workbench.screens.dashboard import DashboardScreen

        return lambda: DashboardScreen(run_dir)
    if kind == "rate":
        from workbench.screens.rating import RatingScreen

        return lambda: RatingScreen(run_dir, prompts_file=prompts)
    if kind == "leaderboard":
        from workbench.screens.leaderboard import LeaderboardScreen

        return lambda: LeaderboardScreen(run_dir)
    raise SystemExit(f"error: unknown screen {kind!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.screens.standalone")
    parser.add_argument("screen", choices=["dashboard", "rate", "leaderboard"])
    parser.add_argument("run", help="run directory, e.g. runs/tiny")
    parser.add_argument("--prompts", help="rating: a file with one prompt per line")
    args = parser.parse_args(argv)
    if not Path(args.run).is_dir():
        print(f"error: no run directory at {args.run}", file=sys.stderr)
        return 2
    ScreenApp(screen_factory(args.screen, args.run, args.prompts)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

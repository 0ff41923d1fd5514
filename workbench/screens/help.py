"""`?`: what the screen underneath does and every key it answers to.

The key table is built from the screen's live bindings, so help, footer and
command palette always agree.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Markdown, Static

GENERAL = """\
**Keys everywhere**: `?` this help · `ctrl+p` command palette (every action, searchable) · \
`escape` back · `q` quit. Leaving a screen or the app never stops training: \
engines run detached and keep going over a dropped SSH connection.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", key_display="?", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def __init__(self, about: Screen) -> None:
        super().__init__()
        self.about = about

    def compose(self) -> ComposeResult:
        title = getattr(self.about, "TITLE", None) or type(self.about).__name__.replace("Screen", "")
        with VerticalScroll(id="help-box"):
            yield Static(f"[b]{title}[/b]: keys", id="help-title")
            yield DataTable(id="help-keys", cursor_type="none", zebra_stripes=True, show_cursor=False)
            doc = getattr(self.about, "HELP", None)
            if doc:
                yield Markdown(doc, id="help-doc")
            yield Markdown(GENERAL, id="help-general")
            yield Static("[dim]escape to close[/dim]", id="help-close")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        from workbench.app import long_name, screen_actions

        rows: dict[str, tuple[list[str], str]] = {}  # name -> (keys, what it does): one row per action
        for active in screen_actions(self.about):
            b = active.binding
            keys, tooltip = rows.setdefault(long_name(self.about, b), ([], b.tooltip or ""))
            if self.app.get_key_display(b) not in keys:
                keys.append(self.app.get_key_display(b))
        table = self.query_one("#help-keys", DataTable)
        # "What it does" wraps to what the box leaves it (90 columns at most, app.tcss) rather than
        # running off an 80-column terminal: box border and padding, scrollbar, one space around each cell
        key_width = max((len(" ".join(keys)) for keys, _ in rows.values()), default=3)
        name_width = max((len(name) for name in rows), default=6)
        free = min(90, self.app.size.width) - 6 - key_width - name_width - 6
        table.add_columns("Key", "Action")
        table.add_column("What it does", width=max(20, free))
        for name, (keys, tooltip) in rows.items():
            table.add_row(" ".join(keys), name, tooltip, height=None)

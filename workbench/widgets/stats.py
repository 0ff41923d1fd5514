"""Stat rows: a label, a value and a sparkline of its recent history, one line each."""

from __future__ import annotations

import math
from typing import Sequence

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, Sparkline


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class StatRow(Horizontal):
    """`label  value  ▁▂▃▅▇`: the sparkline is the mean of each column's slice of history."""

    DEFAULT_CSS = """
    StatRow { height: 1; width: 1fr; }
    StatRow > .stat-label { width: 6; color: $text-muted; }
    StatRow > .stat-value { width: 10; text-style: bold; }
    StatRow > Sparkline { width: 1fr; min-width: 4; margin-right: 1; }
    """

    def __init__(self, label: str, value: str = "n/a", *, value_width: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._label = label
        self._value = value
        self._value_width = value_width

    def compose(self) -> ComposeResult:
        yield Label(self._label, classes="stat-label")
        value = Label(self._value, classes="stat-value")
        if self._value_width:
            value.styles.width = self._value_width
        yield value
        yield Sparkline([], summary_function=_mean)

    def set(self, value: str, history: Sequence[float] | None = None) -> None:
        self.query_one(".stat-value", Label).update(value)
        if history is not None:
            clean = [v for v in history if isinstance(v, (int, float)) and math.isfinite(v)]
            spark = self.query_one(Sparkline)
            spark.data = clean
            spark.visible = len(clean) >= 2  # one point (or none) is not a trend: a full or flat bar misleads

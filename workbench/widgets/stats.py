"""Stat rows: a label, a value and a sparkline of its recent history, one line each."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, Sparkline


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class ScaledSparkline(Sparkline):
    """A sparkline on a fixed scale (0-100 for percentages).

    Textual's Sparkline stretches whatever it gets from its min to its max, so a steady
    100 % CPU drew as an empty line and 1.0 -> 1.1 GB of RAM as a jump to the top.
    """

    BARS = "▁▂▃▄▅▆▇█"

    def __init__(self, low: float, high: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.low, self.high = low, high

    def render(self) -> Text:
        data, width = list(self.data or []), self.size.width
        if not data or width <= 0:
            return Text()
        _, base = self.background_colors
        low_color = base + self.get_component_styles("sparkline--min-color").color
        high_color = base + self.get_component_styles("sparkline--max-color").color
        text = Text()
        for i in range(width):  # each column: the mean of its slice of history, as Sparkline does
            start = i * len(data) // width
            part = data[start:(i + 1) * len(data) // width] or data[start:start + 1]
            ratio = min(1.0, max(0.0, (_mean(part) - self.low) / (self.high - self.low)))
            text.append(self.BARS[round(ratio * (len(self.BARS) - 1))],
                        style=Style(color=low_color.blend(high_color, ratio).rich_color))
        return text


class StatRow(Horizontal):
    """`label  value  ▁▂▃▅▇`: the sparkline is the mean of each column's slice of history."""

    DEFAULT_CSS = """
    StatRow { height: 1; width: 1fr; }
    StatRow > .stat-label { width: 6; color: $text-muted; }
    StatRow > .stat-value { width: 10; text-style: bold; }
    StatRow > Sparkline { width: 1fr; min-width: 4; margin-right: 1; }
    """

    def __init__(self, label: str, value: str = "n/a", *, value_width: int | None = None,
                 scale: tuple[float, float] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._label = label
        self._value = value
        self._value_width = value_width
        self._scale = scale  # a fixed (low, high) for the sparkline, else it spans the data's own range

    def compose(self) -> ComposeResult:
        yield Label(self._label, classes="stat-label")
        value = Label(self._value, classes="stat-value")
        if self._value_width:
            value.styles.width = self._value_width
        yield value
        yield ScaledSparkline(*self._scale) if self._scale else Sparkline([], summary_function=_mean)

    def set(self, value: str, history: Sequence[float] | None = None) -> None:
        self.query_one(".stat-value", Label).update(value)
        if history is not None:
            clean = [v for v in history if isinstance(v, (int, float)) and math.isfinite(v)]
            spark = self.query_one(Sparkline)
            spark.data = clean
            spark.visible = len(clean) >= 2  # one point (or none) is not a trend: a full or flat bar misleads

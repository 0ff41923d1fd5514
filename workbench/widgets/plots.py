"""The loss plot: train and validation curves over steps or tokens (textual-plotext)."""

from __future__ import annotations

import numpy as np
from textual_plotext import PlotextPlot

from workbench.engine.formatting import count
from workbench.history import HistoryView


def ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Exponential moving average, bias-corrected so the first points are not pulled to zero."""
    out = np.empty_like(values)
    avg = 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


class LossPlot(PlotextPlot):
    """Train loss (raw faint, smoothed bright; bucket-averaged when long) and val loss, against steps or tokens."""

    DEFAULT_CSS = """
    LossPlot { min-height: 6; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view: HistoryView | None = None
        self.by_tokens = False

    def show(self, view: HistoryView | None = None, by_tokens: bool | None = None) -> None:
        if view is not None:
            self.view = view
        if by_tokens is not None:
            self.by_tokens = by_tokens
        self._draw()
        self.refresh()

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_data()
        view = self.view
        waiting = view is None or (not len(view.loss) and not len(view.val_loss))
        plt.title("waiting for the first step" if waiting else "")  # clear_data keeps the title
        if waiting:
            return
        x_train = view.tokens if self.by_tokens else view.steps
        x_val = view.eval_tokens if self.by_tokens else view.eval_steps
        lows, highs = [], []
        series = []
        keep = np.isfinite(x_train) & np.isfinite(view.loss)
        if keep.any():
            xs, ys = x_train[keep], view.loss[keep]
            # raw train loss faint, its moving average bright (as TensorBoard's smoothing does)
            series.append((xs, ys, None, "braille", "gray"))
            series.append((xs, ema(ys, 0.9), "train", "braille", "cyan"))
        keep = np.isfinite(x_val) & np.isfinite(view.val_loss)
        if keep.any():
            series.append((x_val[keep], view.val_loss[keep], "val", "hd", "orange"))
        for xs, ys, label, marker, color in series:
            xs, ys = xs.tolist(), ys.tolist()
            plt.plot(xs, ys, label=label, marker=marker, color=color)
            # the first steps' loss is far above the rest: leave it off the scale once the run is past it
            tail = ys[len(ys) // 20:] or ys
            lows.append(min(ys))
            highs.append(max(tail))
        if lows:
            low, high = min(lows), max(highs)
            pad = (high - low) * 0.05 or 0.05
            plt.ylim(low - pad, high + pad)
        xs = x_train[np.isfinite(x_train)] if len(x_train) else x_val[np.isfinite(x_val)]
        if len(xs):
            # plotext would print 150.5 steps and 1200000.0 tokens; say 150 and 1.2M
            low, high = float(xs.min()), float(xs.max())
            ticks = sorted({round(t) for t in np.linspace(low, high, 5)})
            plt.xticks(ticks, [count(t) for t in ticks])

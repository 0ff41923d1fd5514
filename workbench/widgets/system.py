"""CPU, RAM and per-GPU panel, fed from `system` events (workbench.engine.events.System; readings may be None)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label

from workbench.engine import formatting as fmt
from workbench.history import GpuView, HistoryView
from workbench.widgets.stats import StatRow


class GpuRows(Vertical):
    """Two lines for one GPU: utilisation with its sparkline, then memory, temperature and power."""

    DEFAULT_CSS = """
    GpuRows { height: auto; }
    GpuRows > .gpu-detail { padding-left: 2; color: $text-muted; height: 1; }
    """

    def __init__(self, index: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.index = index

    def compose(self) -> ComposeResult:
        yield StatRow(f"GPU{self.index}", value_width=5, scale=(0, 100))
        yield Label("", classes="gpu-detail")

    def show(self, gpu: GpuView) -> None:
        g = gpu.latest
        self.query_one(StatRow).set(fmt.percent(g["util_percent"]), gpu.util)
        power, limit = g["power_w"], g["power_limit_w"]
        wide = self.size.width >= 40
        if fmt.is_number(power):
            watts = f"{power:.0f}/{limit:.0f}W" if wide and fmt.is_number(limit) else f"{power:.0f}W"
        else:
            watts = f"{fmt.NA} W"
        parts = [f"mem {fmt.nbytes_pair(g['mem_used_bytes'], g['mem_total_bytes'])}",
                 f"{fmt.fixed(g['temp_c'], 0)}°C", watts]
        self.query_one(".gpu-detail", Label).update(" · ".join(parts))


class SystemPanel(Vertical):
    DEFAULT_CSS = """
    SystemPanel { height: auto; }
    SystemPanel > #no-gpu { color: $text-muted; padding-left: 6; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._gpu_count: int | None = None

    def compose(self) -> ComposeResult:
        yield StatRow("CPU", value_width=5, scale=(0, 100), id="cpu")
        yield StatRow("RAM", value_width=13, scale=(0, 100), id="ram")
        yield Label("waiting for system stats", id="no-gpu")

    def show(self, view: HistoryView) -> None:
        s = view.system
        if s is None:
            return
        # the machine's CPU use, 0-100 % of all its cores (the engine's own is process_cpu_percent)
        self.query_one("#cpu", StatRow).set(fmt.percent(s["cpu_percent"]), view.cpu)
        self.query_one("#ram", StatRow).set(fmt.nbytes_pair(s["ram_used_bytes"], s["ram_total_bytes"]), view.ram)
        if len(view.gpus) != self._gpu_count:
            self._gpu_count = len(view.gpus)
            self.query(GpuRows).remove()
            self.mount_all([GpuRows(g.index) for g in view.gpus])
            self.query_one("#no-gpu", Label).update("no GPU stats (CPU run)")
            self.query_one("#no-gpu", Label).display = not view.gpus
            self.call_after_refresh(self._fill, view)
        else:
            self._fill(view)

    def _fill(self, view: HistoryView) -> None:
        for rows, gpu in zip(self.query(GpuRows), view.gpus, strict=False):  # new rows mount a refresh later
            rows.show(gpu)


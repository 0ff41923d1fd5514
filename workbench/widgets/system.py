"""CPU, RAM and per-GPU panel, fed from `system` events (every field may be missing)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label

from workbench.history import GpuView, HistoryView
from workbench.widgets import format as fmt
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
        self.query_one(StatRow).set(fmt.percent(_get(g, "util_percent", "util")), gpu.util)
        used, total = _get(g, "mem_used_bytes", "mem_used"), _get(g, "mem_total_bytes", "mem_total")
        power, limit = _get(g, "power_w", "power"), _get(g, "power_limit_w", "power_limit")
        temp = _get(g, "temp_c", "temp")
        wide = self.size.width >= 40
        if isinstance(power, (int, float)):
            watts = f"{power:.0f}/{limit:.0f}W" if wide and isinstance(limit, (int, float)) else f"{power:.0f}W"
        else:
            watts = "n/a W"
        parts = [f"mem {fmt.nbytes_pair(used, total)}",
                 f"{temp:.0f}°C" if isinstance(temp, (int, float)) else "n/a °C", watts]
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
        yield StatRow("RAM", value_width=11, scale=(0, 100), id="ram")
        yield Label("waiting for system stats", id="no-gpu")

    def show(self, view: HistoryView) -> None:
        s = view.system
        if not s:
            return
        self.query_one("#cpu", StatRow).set(fmt.percent(_get(s, "machine_cpu_percent", "cpu_percent")), view.cpu)
        used, total = _get(s, "ram_used_bytes", "ram_used"), _get(s, "ram_total_bytes", "ram_total")
        self.query_one("#ram", StatRow).set(fmt.nbytes_pair(used, total), view.ram)
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
        for rows, gpu in zip(self.query(GpuRows), view.gpus):
            rows.show(gpu)


def _get(d: dict, *keys: str):
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    return None

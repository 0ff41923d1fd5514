"""System stats: a sampler thread that writes `system` events at a fixed interval.

Each event (workbench.engine.events.System, which defines every field and its unit)
holds the machine's and the engine process's CPU and memory (psutil) and, per GPU,
what NVML reports (nvidia-ml-py): utilisation, memory, temperature, power draw and
limit, SM clock. As nvitop does, every NVML field may fail on its
own and is then null; a machine with no GPU, no driver or no NVML library gets
`gpus: []` and one `log` event saying why, never a crash. The engine's own GPU
memory comes from torch.cuda when the engine has already loaded torch and CUDA;
this module never imports torch itself.

Units: bytes, percent, degrees Celsius, watts, MHz.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import psutil

from workbench.engine.events import EngineGpu, Gpu

Emit = Callable[..., Any]  # EventWriter.emit(type, **fields)


def _field(read: Callable[[], Any]) -> Any:
    """One NVML reading, or None when the device, driver or library cannot give it."""
    try:
        return read()
    except Exception:  # pynvml.NVMLError and its many subclasses, or a missing function
        return None


def _decode(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def gpu_stats(nvml, handles: list) -> list[Gpu]:
    """Per-GPU readings through the `nvml` module (pynvml); missing fields are None."""
    return [_one_gpu(nvml, index, h) for index, h in enumerate(handles)]


def _one_gpu(nvml, index: int, h) -> Gpu:
    util = _field(lambda: nvml.nvmlDeviceGetUtilizationRates(h))
    mem = _field(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
    power_mw = _field(lambda: nvml.nvmlDeviceGetPowerUsage(h))
    limit_mw = _field(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
    return {
        "index": index,
        "name": _field(lambda: _decode(nvml.nvmlDeviceGetName(h))),
        "util_percent": _field(lambda: util.gpu),
        "mem_used_bytes": _field(lambda: mem.used),
        "mem_total_bytes": _field(lambda: mem.total),
        "temp_c": _field(lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
        "power_w": None if power_mw is None else power_mw / 1000,
        "power_limit_w": None if limit_mw is None else limit_mw / 1000,
        "sm_clock_mhz": _field(lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)),
    }


def open_nvml() -> tuple[Any, list, str | None]:
    """(nvml module, device handles, None) or (None, [], why there are no GPU stats)."""
    try:
        import pynvml
    except ImportError:
        return None, [], "no GPU stats: nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return None, [], f"no GPU stats: NVML unavailable ({e})"
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    except Exception as e:
        return None, [], f"no GPU stats: NVML could not list devices ({e})"
    if not handles:
        return pynvml, [], "no GPU stats: NVML found no GPU"
    return pynvml, handles, None


def engine_gpu_memory() -> EngineGpu | None:
    """torch's allocated/reserved bytes on the current CUDA device, if the engine uses CUDA."""
    torch = sys.modules.get("torch")  # only if the engine already imported it
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        device = torch.cuda.current_device()
        return {"device": device, "allocated_bytes": torch.cuda.memory_allocated(device),
                "reserved_bytes": torch.cuda.memory_reserved(device)}
    except Exception:
        return None


class SystemSampler:
    """Writes a `system` event every `interval` seconds on a daemon thread."""

    def __init__(self, emit: Emit, interval: float = 1.0):
        if not interval > 0:
            raise ValueError(f"system stats interval must be positive, got {interval}")
        self.emit = emit
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-stats", daemon=True)
        self._process = psutil.Process()
        self._nvml = None
        self._handles: list = []

    def start(self) -> SystemSampler:
        self._nvml, self._handles, why = open_nvml()
        if why:
            self.emit("log", level="info", message=why)
        self._thread.start()
        return self

    def sample(self) -> dict[str, Any]:
        """The fields of one System event."""
        vm = psutil.virtual_memory()
        return {
            "cpu_percent": psutil.cpu_percent(None),  # the machine: 0-100
            "process_cpu_percent": self._process.cpu_percent(None),  # the engine: above 100 on several cores
            "cpu_count": psutil.cpu_count(),
            "rss_bytes": self._process.memory_info().rss,
            "ram_used_bytes": vm.total - vm.available,
            "ram_total_bytes": vm.total,
            "gpus": gpu_stats(self._nvml, self._handles) if self._nvml else [],
            "engine_gpu": engine_gpu_memory(),
        }

    def _loop(self) -> None:
        # cpu_percent measures since the previous call (psutil keeps that per thread): prime here
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)
        while not self._stop.wait(self.interval):
            try:
                self.emit("system", **self.sample())
            except ValueError:  # the event file was closed under us at shutdown
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._nvml is not None:
            _field(self._nvml.nvmlShutdown)

"""System stats: the sampler thread writes `system` events; no GPU means `gpus: []` and one log line."""

from __future__ import annotations

import time

import pynvml
import pytest
from engine_helpers import wait_for

from workbench.engine.events import EventWriter, read_events
from workbench.engine.sysstats import SystemSampler, gpu_stats, open_nvml


def test_sampler_writes_system_events_at_its_interval(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    sampler = SystemSampler(writer.emit, interval=0.05).start()
    try:
        wait_for(lambda: len([e for e in read_events(path)[0] if e["type"] == "system"]) >= 4, timeout=10)
    finally:
        sampler.stop()
        writer.close()
    events = read_events(path)[0]
    system = [e for e in events if e["type"] == "system"]
    first = system[0]
    for key in ("cpu_percent", "process_cpu_percent", "rss_bytes", "ram_used_bytes", "ram_total_bytes"):
        assert isinstance(first[key], (int, float)) and first[key] >= 0, key
    assert all(e["cpu_percent"] <= 100 for e in system)  # the machine's share, whatever the engine's
    assert first["rss_bytes"] > 10 * 2**20  # this Python process is bigger than 10 MiB
    assert 0 < first["ram_used_bytes"] <= first["ram_total_bytes"]
    assert all(e["v"] == 2 and e["t"] > 0 for e in system)
    # no new events once stopped
    count = len(read_events(path)[0])
    time.sleep(0.15)
    assert len(read_events(path)[0]) == count

    nvml, handles, why = open_nvml()
    logs = [e for e in events if e["type"] == "log"]
    if why is None:  # a machine with a GPU: real readings
        assert len(first["gpus"]) == len(handles) and not logs
        gpu = first["gpus"][0]
        assert set(gpu) >= {"util_percent", "mem_used_bytes", "mem_total_bytes", "temp_c", "power_w",
                            "power_limit_w", "sm_clock_mhz"}
        assert gpu["mem_total_bytes"] > 0
    else:  # no GPU / no driver / no NVML: empty stats and exactly one line saying why
        assert all(e["gpus"] == [] for e in system)
        assert len(logs) == 1 and logs[0]["message"].startswith("no GPU stats")


class PartlyBrokenNVML:
    """NVML as a flaky driver gives it: some fields answer, some raise NVMLError.

    There is no GPU on CI machines, so this stands in for the driver to prove that
    one failing field leaves the rest of the reading intact.
    """

    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM

    class Util:
        gpu = 87

    class Mem:
        used, total = 3 * 2**30, 80 * 2**30

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, h):
        return self.Util()

    def nvmlDeviceGetMemoryInfo(self, h):
        return self.Mem()

    def nvmlDeviceGetTemperature(self, h, sensor):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetPowerUsage(self, h):
        return 312_500  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)

    def nvmlDeviceGetClockInfo(self, h, clock):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)


def test_each_nvml_field_may_fail_on_its_own():
    (gpu,) = gpu_stats(PartlyBrokenNVML(), handles=[object()])
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"
    assert gpu["util_percent"] == 87
    assert gpu["mem_used_bytes"] == 3 * 2**30 and gpu["mem_total_bytes"] == 80 * 2**30
    assert gpu["power_w"] == 312.5
    assert gpu["temp_c"] is None and gpu["power_limit_w"] is None and gpu["sm_clock_mhz"] is None


def test_sampler_survives_its_event_file_closing(tmp_path):
    writer = EventWriter(tmp_path / "events.jsonl")
    sampler = SystemSampler(writer.emit, interval=0.02).start()
    writer.close()  # the engine shutting down before the sampler
    time.sleep(0.1)
    sampler.stop()
    assert not sampler._thread.is_alive()


def test_interval_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        SystemSampler(print, interval=0)

"""Where a run computes: the torch device, the compute dtype, and the peak FLOP/s that MFU is measured against.

The peak comes from workbench.engine.estimates: a GPU by its name in the table (bf16 tensor-core or
fp32 peak), the CPU from its cores, clock and vector width. An unknown GPU has no peak:
MFU is then None and shown as "n/a", never a guess against some other card.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from workbench.engine import estimates
from workbench.engine.config import TrainConfig
from workbench.engine.errors import ConfigError


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    dtype: torch.dtype  # compute dtype under autocast (float32 = no autocast)
    name: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 threads)"
    peak_flops: float | None  # dense peak FLOP/s at `dtype`, None when unknown

    @property
    def type(self) -> str:
        return self.device.type

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    def autocast(self):
        """Context manager for forward passes: bf16 autocast, or nothing in fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def mfu(self, flops_per_token: float, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation as a fraction of peak, or None when the peak is unknown."""
        if not self.peak_flops or tokens_per_s <= 0:
            return None
        return flops_per_token * tokens_per_s / self.peak_flops


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {name!r} but no CUDA GPU is available here (use \"auto\" or \"cpu\")")
        index = int(name[5:]) if name.startswith("cuda:") else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device = {name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
        return torch.device("cuda", index)
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.dtype = \"bfloat16\" but this GPU does not support bf16; use \"float32\"")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def device_info(train: TrainConfig) -> DeviceInfo:
    """Resolve train.device / train.dtype / train.threads into a DeviceInfo (sets torch's thread count)."""
    if train.threads:
        torch.set_num_threads(train.threads)
    device = pick_device(train.device)
    dtype = pick_dtype(train.dtype, device)
    bf16 = dtype == torch.bfloat16
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = estimates.peak_flops(name, bf16)
    else:
        threads = torch.get_num_threads()
        name = f"cpu ({threads} thread{'s' if threads != 1 else ''})"
        peak = estimates.cpu_peak_flops(threads)
        if bf16:
            peak = None  # the CPU table is fp32 only
    return DeviceInfo(device, dtype, name, peak)

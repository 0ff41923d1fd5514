"""Kernels for the transformer: CuPy CUDA kernels and their PyTorch references.

`select(mode, device)` returns the set of ops the model and trainer call:
    add_rms_norm(x, delta, weight, eps) -> (h, y)
    rope(q, k, cos, sin) -> (q, k)
    swiglu(gate, up) -> out
    linear_cross_entropy(h, weight, targets, ignore_index) -> per-token loss (float32)
    adamw(param_groups, lr, betas, eps) -> torch.optim.Optimizer
`mode` is "auto" | "cupy" | "torch": auto uses the CuPy kernels on CUDA when they load,
else the references; `Ops.reason` says which was chosen and why, for the run's log.
When it cannot give what `mode` asks for, select raises KernelsUnavailable, whose message is
written for the user (the engine reports it as a config error). This package imports nothing
from workbench.engine: the engine depends on the kernels, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class KernelsUnavailable(ValueError):
    """select() cannot give the ops asked for: an unknown mode, or "cupy" where the CuPy kernels cannot run."""


@dataclass(frozen=True)
class Ops:
    name: str  # "torch" or "cupy"
    reason: str
    add_rms_norm: Callable
    rope: Callable
    swiglu: Callable
    linear_cross_entropy: Callable
    adamw: Callable


def reference_ops(reason: str) -> Ops:
    from workbench.kernels.adamw import adamw_reference
    from workbench.kernels.linear_cross_entropy import linear_cross_entropy_reference
    from workbench.kernels.rmsnorm import add_rms_norm_reference
    from workbench.kernels.rope import rope_reference
    from workbench.kernels.swiglu import swiglu_reference

    return Ops("torch", reason, add_rms_norm_reference, rope_reference, swiglu_reference,
               linear_cross_entropy_reference, adamw_reference)


# The kernel files cupy_ops() compiles up front, so "auto" falls back at selection time.
CUPY_SOURCES = ["rmsnorm.cu", "rope.cu", "swiglu.cu", "linear_cross_entropy.cu", "adamw.cu"]


def cupy_ops() -> Ops:
    """The CuPy kernels; raises ImportError/RuntimeError when they cannot load here."""
    from workbench.kernels.cupy_launch import require

    require(CUPY_SOURCES)  # CuPy importable, a CUDA device, and every file compiles (NVRTC) on it
    from workbench.kernels.adamw import adamw_cupy
    from workbench.kernels.linear_cross_entropy import linear_cross_entropy_cupy
    from workbench.kernels.rmsnorm import add_rms_norm_cupy
    from workbench.kernels.rope import rope_cupy
    from workbench.kernels.swiglu import swiglu_cupy

    return Ops("cupy", "CuPy CUDA kernels (kernels/*.cu)", add_rms_norm_cupy, rope_cupy, swiglu_cupy,
               linear_cross_entropy_cupy, adamw_cupy)


def select(mode: str, device_type: str) -> Ops:
    if mode not in ("auto", "cupy", "torch"):
        raise KernelsUnavailable(f"train.kernels must be auto, cupy or torch, got {mode!r}")
    if mode == "torch":
        return reference_ops("kernels = \"torch\" in the config")
    if device_type != "cuda":
        if mode == "cupy":
            raise KernelsUnavailable("kernels = \"cupy\" needs a CUDA device; use \"auto\" or \"torch\" on the CPU")
        return reference_ops(f"PyTorch reference ops: the device is {device_type}, not CUDA")
    try:
        return cupy_ops()
    except Exception as e:  # noqa: BLE001 - any load failure falls back under auto
        if mode == "cupy":
            raise KernelsUnavailable(f"kernels = \"cupy\" but the CuPy kernels cannot load: {e}") from None
        return reference_ops(f"PyTorch reference ops: CuPy kernels unavailable ({e})")

"""Launch the kernels of kernels/<op>.cu on PyTorch tensors: CuPy on CUDA, the emulation on CPU.

A *backend* has one method, used by every op wrapper:

    backend.launch(source, name, grid, block, args, shared_bytes=0)

`source` is a file name in kernels/ ("rmsnorm.cu"), `name` an `extern "C"` kernel in it, `args`
the kernel's arguments in order: tensors (passed as raw device pointers, `t.data_ptr()`),
None (a null pointer), numpy scalars (np.int32, np.int64, np.float32: their size is what the
kernel receives), or Python numbers (int -> int32, float -> float32). `backend.sm_count(device)`
tells how many multiprocessors a grid sized to the GPU should cover.

`CupyBackend` compiles each file once per device with `cupy.RawModule` (NVRTC) and launches on
PyTorch's current stream, so kernels order correctly with PyTorch's own work; outputs are
always allocated by PyTorch. `backend_for(device)` picks CuPy for CUDA tensors and, for CPU
tensors, the backend a test installed with `use_cpu_backend` (the emulation harness's
EmulationBackend), so the same wrapper code runs in CPU tests; otherwise it refuses clearly.

Input checks shared by the wrappers live here too (`check`, `rows_of`, `aligned`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.kernels.compile_check import nvrtc_source

KERNELS_DIR = Path(__file__).resolve().parent
NVRTC_OPTIONS = ("--std=c++17",)  # local headers are pasted in by nvrtc_source
SHARED_DEFAULT_LIMIT = 48 * 1024  # above this a kernel must opt in (cudaFuncSetAttribute)


def kernel_arg(a: Any):
    """A launch argument as CuPy wants it: pointers as uint64, numbers with an explicit size."""
    if isinstance(a, torch.Tensor):
        return np.uint64(a.data_ptr())
    if a is None:
        return np.uint64(0)
    if isinstance(a, np.generic):
        return a
    if isinstance(a, bool):
        return np.int32(a)
    if isinstance(a, int):
        if not -(1 << 31) <= a < (1 << 31):
            raise ValueError(f"kernel argument {a} does not fit int32: pass np.int64 for 64-bit parameters")
        return np.int32(a)
    if isinstance(a, float):
        return np.float32(a)
    raise TypeError(f"cannot pass {type(a).__name__} to a kernel")


_modules: dict[tuple[str, int], Any] = {}
_functions: dict[tuple[str, int, str], Any] = {}
_streams: dict[int, Any] = {}
_lock = threading.Lock()


def cupy_missing() -> str | None:
    """None when the CuPy kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    try:
        import cupy  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a CUDA library that fails to load
        return f"CuPy is not installed or does not load ({e}); pip install -e '.[gpu]'"
    return None


def load_module(source: str, device_index: int):
    """cupy.RawModule for kernels/<source>, compiled (NVRTC) once per device; raises on compile errors."""
    import cupy

    key = (source, device_index)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            with cupy.cuda.Device(device_index):
                mod = cupy.RawModule(code=nvrtc_source(KERNELS_DIR / source), options=NVRTC_OPTIONS)
                compile_now = getattr(mod, "compile", None)
                if compile_now is not None:
                    compile_now()  # errors surface here (at op selection), not at the first launch
            _modules[key] = mod
    return mod


class CupyBackend:
    """Launches kernels on CUDA tensors with CuPy, on PyTorch's current stream."""

    device_type = "cuda"

    def sm_count(self, device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    def launch(self, source: str, name: str, grid, block, args: Sequence[Any], shared_bytes: int = 0) -> None:
        import cupy

        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device.index if tensors and tensors[0].is_cuda else torch.cuda.current_device()
        for a in tensors:
            if a.device.type != "cuda" or a.device.index != device:
                raise ValueError(f"{name}: every tensor must be on cuda:{device}, got one on {a.device}")
        fn = _functions.get((source, device, name))
        if fn is None:
            fn = _functions[(source, device, name)] = load_module(source, device).get_function(name)
        if shared_bytes > SHARED_DEFAULT_LIMIT and fn.max_dynamic_shared_size_bytes < shared_bytes:
            fn.max_dynamic_shared_size_bytes = shared_bytes
        stream_ptr = torch.cuda.current_stream(device).cuda_stream
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
        block = tuple(block) if isinstance(block, (tuple, list)) else (block,)
        with cupy.cuda.Device(device):
            stream = _streams.get(stream_ptr)
            if stream is None:
                stream = _streams[stream_ptr] = cupy.cuda.ExternalStream(stream_ptr)
            with stream:
                fn(grid, block, tuple(kernel_arg(a) for a in args), shared_mem=shared_bytes)


_cupy_backend = CupyBackend()
_cpu_backend = None


def use_cpu_backend(backend) -> None:
    """Run the ops' CUDA sources on CPU tensors through `backend` (tests: EmulationBackend), or stop (None)."""
    global _cpu_backend
    _cpu_backend = backend


@contextmanager
def cpu_backend(backend) -> Iterator[None]:
    """`with cpu_backend(EmulationBackend()):` the CuPy ops accept CPU tensors inside the block."""
    global _cpu_backend
    previous, _cpu_backend = _cpu_backend, backend
    try:
        yield
    finally:
        _cpu_backend = previous


def backend_for(device: torch.device, op: str):
    if device.type == "cuda":
        return _cupy_backend
    if device.type == "cpu" and _cpu_backend is not None:
        return _cpu_backend
    raise ValueError(f"{op}: the CuPy kernels run on CUDA tensors, got a tensor on {device}")


# ------------------------------------------------------------------ input checks for the wrappers
def check(op: str, name: str, t: torch.Tensor | None, *, dtypes: Sequence[torch.dtype] | None = None,
          device: torch.device | None = None, shape: Sequence[int] | None = None,
          min_dim: int | None = None) -> None:
    """Raise a clear ValueError unless tensor `name` of `op` has the expected dtype, device and shape."""
    if t is None:
        raise ValueError(f"{op}: {name} is required")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} must be {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def rows_of(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """View t (..., C) as rows of C contiguous elements: (tensor, rows, C, row stride in elements).

    Keeps the memory when the last dim is contiguous and the leading dims collapse to one stride
    (a slice like qkv[..., :C] qualifies); otherwise copies to a contiguous tensor."""
    C = t.shape[-1]
    rows = t.numel() // C if C else 0
    if rows <= 1:
        return (t if t.stride(-1) == 1 or C <= 1 else t.contiguous()), rows, C, C
    if t.stride(-1) == 1:
        lead = [(n, s) for n, s in zip(t.shape[:-1], t.stride()[:-1], strict=True) if n != 1]
        if all(outer == inner * n for (_, outer), (n, inner) in pairwise(lead)) and lead[-1][1] >= C:
            return t, rows, C, lead[-1][1]
    return t.contiguous(), rows, C, C


def aligned(nbytes: int, *items: Any) -> bool:
    """True when every tensor's address and every integer (a stride in bytes) is a multiple of nbytes."""
    for it in items:
        if it is None:
            continue
        value = it.data_ptr() if isinstance(it, torch.Tensor) else int(it)
        if value % nbytes:
            return False
    return True


def require(sources: Sequence[str]) -> None:
    """Compile the given kernel files on the current CUDA device now (raises on any failure)."""
    why = cupy_missing()
    if why:
        raise RuntimeError(why)
    device = torch.cuda.current_device()
    for s in sources:
        load_module(s, device)

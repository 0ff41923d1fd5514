"""Run CUDA C kernels on the CPU: compile a .cu as C++ with g++ and launch its kernels via ctypes.

The same source nvcc builds runs here unchanged: `cuda_emu.h` (force-included) maps the CUDA
built-ins onto fibers, one per GPU thread, and `cuda_bf16.h` here stands in for CUDA's header.
See cuda_emu.h for how races and warp-shuffle misuse are caught.

API (for every kernel test):

    from workbench.kernels.emulation import harness
    if (why := harness.compiler_missing()): pytest.skip(why)
    mod = harness.load("kernels/rmsnorm.cu")        # compiled once, cached by content hash
    mod.kernels                                     # {name: Kernel}, Kernel.signature like ["*f32", "i32", "f32"]
    mod.launch("rmsnorm_dw_reduce", grid=(24,), block=(32, 32), args=[partial, dw, parts, C],
               shared_bytes=0, schedule="forward")  # or "reverse" / "random" (with seed=)

Arguments follow the kernel's C signature, which the harness reads from the compiled code:
  - pointer parameters take a numpy array or a CPU torch.Tensor (any strides, element type must
    match the pointee: float* <- float32, bf16/__nv_bfloat16* <- torch.bfloat16, ...), or None
    for a null pointer. Each buffer is copied into a fresh allocation with 1 KiB guard zones of
    0xFF bytes (NaN) on both sides: reading past the end reads NaN, writing past it raises
    EmulationError. Arguments whose memory overlaps share one copy, so in-place kernels work.
    Results are copied back into the caller's arrays. (Pointers stored *inside* a buffer, such
    as a multi-tensor pointer table, reach the original memory directly, unguarded.)
  - integer and floating-point parameters take Python or numpy numbers (range-checked).
  - shared_bytes is the dynamic shared memory; max_shared_bytes (default 48 KiB, CUDA's limit
    without cudaFuncSetAttribute) caps dynamic + static shared memory per block.
Every failure (a compile error, a bad argument, a deadlock, a shuffle misuse, a write out of
bounds, a misaligned vector access - checked with g++'s -fsanitize=alignment where it links)
raises EmulationError with one clear message.

Race checks: run the same launch under schedule="forward" and "reverse" (and "random") and
compare the outputs bitwise; `run_schedules(fn)` does that for a function of the schedule.

`EmulationBackend` launches kernels the way kernels/cupy_launch.py does on a GPU, so an op's own
Python wrapper (grid sizes, argument order, dtype dispatch) runs unchanged on CPU tensors.
Kernel source rules: `extern __shared__ T name[];` must be written on one line (it becomes a
pointer to the emulated dynamic shared memory); kernels are `extern "C" __global__` functions.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EMULATION_DIR = Path(__file__).resolve().parent
KERNELS_DIR = EMULATION_DIR.parent
GUARD_BYTES = 1024
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
CXX_FLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", "-ffp-contract=off",
             "-Wno-unused-function", "-Wno-unused-variable", "-Wno-attributes"]


class EmulationError(RuntimeError):
    """A kernel could not be compiled or launched, or misbehaved under emulation."""


def compiler() -> str | None:
    cxx = os.environ.get("CXX", "g++")
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("c++")


def compiler_missing() -> str | None:
    """None when kernels can be emulated here, else the reason (for pytest.skip)."""
    if compiler() is None:
        return "no C++ compiler (g++) on PATH: the CUDA emulation harness needs one"
    return None


# ------------------------------------------------------------------ source preparation
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+((?:(?:__align__|alignas)\s*\(\s*\d+\s*\)\s*)*)"
    r"([A-Za-z_][\w:\s]*?[\w*])\s*((?:(?:__align__|alignas)\s*\(\s*\d+\s*\)\s*)*)"
    r"\b([A-Za-z_]\w*)\s*\[\s*\]\s*;")
_KERNEL = re.compile(r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+"
                     r"(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\(")
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)


def _strip_comments(src: str) -> str:
    # keep newlines so offsets still map to lines
    return _COMMENTS.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), src)


def kernel_names(src: str) -> list[str]:
    """Names of the non-template __global__ functions in a CUDA source."""
    code = _strip_comments(src)
    names = []
    for m in _KERNEL.finditer(code):
        before = code[:m.start()]
        stmt = before[max(before.rfind(";"), before.rfind("}")) + 1:]
        if "template" not in stmt:
            names.append(m.group(1))
    return names


def prepare_source(src: str, filename: str, names: Sequence[str]) -> str:
    """The C++ translation unit for g++: the kernel source plus a launch thunk per kernel."""
    def to_pointer(m: re.Match) -> str:
        ctype = m.group(2).strip()
        return f"{ctype}* const {m.group(4)} = reinterpret_cast<{ctype}*>(::emu::dynamic_smem());"

    body = _EXTERN_SHARED.sub(to_pointer, src)
    if re.search(r"extern\s+__shared__", _strip_comments(body)):
        raise EmulationError(f"{filename}: write each `extern __shared__ T name[];` on one line")
    thunks = "\n".join(
        f'extern "C" void wbemu_thunk_{n}(void** a) {{ ::emu::invoke({n}, a); }}\n'
        f'extern "C" const char* wbemu_signature_{n}() {{ return ::emu::signature({n}); }}'
        for n in names)
    return f'#line 1 "{filename}"\n{body}\n#line 1 "<emulation thunks>"\n{thunks}\n'


# ------------------------------------------------------------------ compile and cache
def cache_dir() -> Path:
    d = os.environ.get("WORKBENCH_EMU_CACHE") or os.path.join(tempfile.gettempdir(), f"workbench-emu-{os.getuid()}")
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    return path


_compiler_version: dict[str, str] = {}


def _version(cxx: str) -> str:
    if cxx not in _compiler_version:
        out = subprocess.run([cxx, "--version"], check=False, capture_output=True, text=True)
        _compiler_version[cxx] = out.stdout
    return _compiler_version[cxx]


_sanitize: dict[str, list[str]] = {}


def _sanitize_flags(cxx: str) -> list[str]:
    """-fsanitize=alignment (misaligned vector accesses become errors) where this g++ can link it."""
    if cxx not in _sanitize:
        flags = ["-fsanitize=alignment", "-Wl,--as-needed"]
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "probe.cpp"
            src.write_text("int probe(int* p) { return *p; }\n")
            ok = subprocess.run([cxx, "-shared", "-fPIC", *flags, str(src), "-o", str(Path(tmp) / "p.so")],
                                capture_output=True).returncode == 0
        _sanitize[cxx] = flags if ok else []
    return _sanitize[cxx]


def _headers_digest(dirs: Sequence[Path]) -> bytes:
    h = hashlib.sha256()
    for d in dirs:
        for p in sorted(Path(d).glob("*.h")) + sorted(Path(d).glob("*.cuh")):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.digest()


def compile_shared_library(path: Path, defines: dict[str, Any] | None = None,
                           include_dirs: Sequence[Path] = ()) -> tuple[Path, list[str]]:
    cxx = compiler()
    if cxx is None:
        raise EmulationError(compiler_missing())
    src = path.read_text()
    tu = prepare_source(src, str(path), [])  # hashed without thunks; names are found below
    includes = [EMULATION_DIR, path.parent, *map(Path, include_dirs)]
    flags = CXX_FLAGS + _sanitize_flags(cxx) + [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    flags += ["-include", str(EMULATION_DIR / "cuda_emu.h")] + [f"-I{d}" for d in includes]
    key = hashlib.sha256()
    for part in (tu.encode(), _headers_digest(includes), " ".join(flags).encode(), _version(cxx).encode()):
        key.update(part)
    digest = key.hexdigest()[:24]
    out = cache_dir() / f"{path.stem}-{digest}.so"
    if out.exists() and out.with_suffix(".kernels").exists():
        return out, out.with_suffix(".kernels").read_text().split()
    # kernel names come from the preprocessed source, so kernels stamped out by macros count too
    pre = subprocess.run([cxx, "-E", "-P", "-D__CUDA_EMU__=1", *[f"-I{d}" for d in includes],
                          "-x", "c++", str(path)], capture_output=True, text=True)
    if pre.returncode != 0:
        raise EmulationError(f"g++ could not preprocess {path.name}:\n{pre.stderr.strip()}")
    names = kernel_names(pre.stdout)
    tu = prepare_source(src, str(path), names)
    tu_path = cache_dir() / f"{path.stem}-{digest}.cpp"
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tu_path.write_text(tu)
    proc = subprocess.run([cxx, *flags, "-x", "c++", str(tu_path), "-o", str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise EmulationError(f"g++ could not compile {path.name} for emulation:\n{proc.stderr.strip()}")
    out.with_suffix(".kernels").write_text(" ".join(names))
    os.replace(tmp, out)  # atomic: concurrent test processes never load a half-written library
    return out, names


# ------------------------------------------------------------------ arguments
_SCALARS = {
    "f32": ctypes.c_float, "f64": ctypes.c_double, "b8": ctypes.c_bool,
    "i8": ctypes.c_int8, "u8": ctypes.c_uint8, "i16": ctypes.c_int16, "u16": ctypes.c_uint16,
    "i32": ctypes.c_int32, "u32": ctypes.c_uint32, "i64": ctypes.c_int64, "u64": ctypes.c_uint64,
}
_NUMPY_CODES = {
    np.dtype(np.float32): "f32", np.dtype(np.float64): "f64", np.dtype(np.bool_): "b8",
    np.dtype(np.int8): "i8", np.dtype(np.uint8): "u8", np.dtype(np.int16): "i16", np.dtype(np.uint16): "u16",
    np.dtype(np.int32): "i32", np.dtype(np.uint32): "u32", np.dtype(np.int64): "i64", np.dtype(np.uint64): "u64",
    np.dtype(np.float16): "f16",
}


def _torch_code(dtype) -> str:
    import torch
    return {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16",
            torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
            torch.bool: "b8", torch.uint16: "u16", torch.uint32: "u32", torch.uint64: "u64"}.get(dtype, str(dtype))


def _pointee_accepts(pointee: str, code: str, itemsize: int) -> bool:
    if pointee == "void":
        return True
    if pointee.startswith("?"):  # a struct the harness has no name for: sizes must be compatible
        return int(pointee[1:]) % itemsize == 0
    vector = re.fullmatch(r"([a-z]+\d+)x\d+", pointee)  # float4 <- float32 buffers, and so on
    return (vector.group(1) if vector else pointee) == code


@dataclass
class _Buffer:
    """The bytes an argument spans: [start, start + nbytes) of the caller's memory."""
    start: int
    nbytes: int
    view: np.ndarray  # uint8 view of the caller's memory over that span


def _buffer_of(arg, index: int, kernel: str, pointee: str) -> _Buffer:
    if isinstance(arg, np.ndarray):
        code, itemsize = _NUMPY_CODES.get(arg.dtype, str(arg.dtype)), arg.itemsize
        shape, strides = arg.shape, tuple(s // arg.itemsize for s in arg.strides)
        if any(s % arg.itemsize for s in arg.strides):
            raise EmulationError(f"{kernel}: argument {index} has strides that are not whole elements")
        start = arg.__array_interface__["data"][0]

        def make_view(span):
            return np.lib.stride_tricks.as_strided(arg, (span,), (itemsize,)).view(np.uint8)
    else:
        import torch
        if not isinstance(arg, torch.Tensor):
            raise EmulationError(f"{kernel}: argument {index} is a pointer ({pointee}); pass a numpy array, "
                                 f"a CPU tensor or None, not {type(arg).__name__}")
        if arg.device.type != "cpu":
            raise EmulationError(f"{kernel}: argument {index} is on {arg.device}; emulation needs CPU tensors")
        t = arg.detach()
        code, itemsize = _torch_code(t.dtype), t.element_size()
        shape, strides, start = tuple(t.shape), tuple(t.stride()), t.data_ptr()

        def make_view(span):
            return torch.as_strided(t, (span,), (1,)).view(torch.uint8).numpy()
    if not _pointee_accepts(pointee, code, itemsize):
        raise EmulationError(f"{kernel}: argument {index} must point to {pointee.lstrip('*')}, got a {code} buffer")
    if any(s < 0 for s in strides):
        raise EmulationError(f"{kernel}: argument {index} has negative strides")
    numel = int(np.prod(shape)) if shape else 1
    span = 0 if numel == 0 else 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    return _Buffer(start, span * itemsize, make_view(span) if span else np.empty(0, np.uint8))


class _Guarded:
    """Fresh copies of the argument buffers, each between guard zones; overlapping buffers share one."""

    def __init__(self, buffers: list[_Buffer | None]):
        self.groups: list[tuple[int, int, np.ndarray, int, list[_Buffer]]] = []
        live = sorted((b for b in buffers if b is not None), key=lambda b: b.start)
        merged: list[list[_Buffer]] = []
        for b in live:
            if merged and b.start < max(m.start + m.nbytes for m in merged[-1]):
                merged[-1].append(b)
            else:
                merged.append([b])
        self.address: dict[int, int] = {}
        for group in merged:
            lo = group[0].start
            hi = max(b.start + b.nbytes for b in group)
            raw = np.full(hi - lo + 2 * GUARD_BYTES + 128, 0xFF, np.uint8)
            # keep the caller's alignment modulo 64, so alignment-dependent paths match the GPU's
            base = raw.ctypes.data
            offset = GUARD_BYTES + (-(base + GUARD_BYTES) % 64) + lo % 64
            for b in group:
                rel = b.start - lo
                raw[offset + rel: offset + rel + b.nbytes] = b.view
                self.address[id(b)] = base + offset + rel
            self.groups.append((lo, hi, raw, offset, group))

    def pointer(self, b: _Buffer) -> int:
        return self.address[id(b)]

    def check_and_copy_back(self, kernel: str, index_of: dict[int, int]) -> None:
        for lo, hi, raw, offset, group in self.groups:
            size = hi - lo
            before, after = raw[:offset], raw[offset + size:]
            if (before != 0xFF).any() or (after != 0xFF).any():
                which = ", ".join(str(index_of[id(b)]) for b in group)
                side = "before the start" if (before != 0xFF).any() else "past the end"
                where = (np.nonzero(before != 0xFF)[0][0] - offset) if side == "before the start" \
                    else int(np.nonzero(after != 0xFF)[0][0])
                raise EmulationError(f"{kernel}: wrote {side} of the buffer of argument {which} "
                                     f"(byte {where} {'relative to its start' if where < 0 else 'after its end'})")
            for b in group:
                rel = b.start - lo
                new = raw[offset + rel: offset + rel + b.nbytes]
                if not np.array_equal(new, b.view):
                    b.view[...] = new


# ------------------------------------------------------------------ modules and launches
@dataclass(frozen=True)
class Kernel:
    name: str
    signature: list[str]
    thunk: int


class Module:
    """A compiled kernel file; `launch` runs one of its kernels."""

    def __init__(self, path: Path, library: Path, names: list[str]):
        self.path = path
        self._lib = ctypes.CDLL(str(library))
        self._lib.wbemu_launch.restype = ctypes.c_int
        self._lib.wbemu_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint),
                                           ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t, ctypes.c_size_t,
                                           ctypes.c_int, ctypes.c_ulonglong]
        self._lib.wbemu_last_error.restype = ctypes.c_char_p
        self.kernels: dict[str, Kernel] = {}
        for n in names:
            sig_fn = self._lib[f"wbemu_signature_{n}"]
            sig_fn.restype = ctypes.c_char_p
            text = sig_fn().decode()
            thunk = ctypes.cast(self._lib[f"wbemu_thunk_{n}"], ctypes.c_void_p).value
            self.kernels[n] = Kernel(n, text.split(",") if text else [], thunk)

    def launch(self, name: str, grid, block, args: Sequence[Any], shared_bytes: int = 0, *,
               schedule: str = "forward", seed: int = 0, max_shared_bytes: int = 48 * 1024,
               guard: bool = True) -> None:
        kernel = self.kernels.get(name)
        if kernel is None:
            raise EmulationError(f"{self.path.name} has no kernel {name!r} (it has {', '.join(self.kernels)})")
        if schedule not in SCHEDULES:
            raise EmulationError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        sig = kernel.signature
        if len(args) != len(sig):
            raise EmulationError(f"{name} takes {len(sig)} arguments ({', '.join(sig)}), got {len(args)}")
        buffers: list[_Buffer | None] = []
        for i, (code, a) in enumerate(zip(sig, args, strict=True)):
            buffers.append(_buffer_of(a, i, name, code[1:]) if code.startswith("*") and a is not None else None)
        guarded = _Guarded(buffers) if guard else None
        keep, slots = [], (ctypes.c_void_p * max(1, len(sig)))()
        for i, (code, a, b) in enumerate(zip(sig, args, buffers, strict=True)):
            if code.startswith("*"):
                ptr = 0 if b is None else (guarded.pointer(b) if guarded else b.start)
                value = ctypes.c_void_p(ptr)
            else:
                value = _scalar(code, a, i, name)
            keep.append(value)
            slots[i] = ctypes.addressof(value)
        g, bl = _dim3(grid, "grid"), _dim3(block, "block")
        rc = self._lib.wbemu_launch(kernel.thunk, slots, (ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*bl),
                                    int(shared_bytes), int(max_shared_bytes), SCHEDULES[schedule], int(seed))
        if rc != 0:
            raise EmulationError(f"{name}: {self._lib.wbemu_last_error().decode()}")
        if guarded:
            guarded.check_and_copy_back(name, {id(b): i for i, b in enumerate(buffers) if b is not None})


def _dim3(v, what: str) -> tuple[int, int, int]:
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    if not 1 <= len(t) <= 3 or any(int(x) < 1 for x in t):
        raise EmulationError(f"{what} must be 1 to 3 positive sizes, got {v!r}")
    t = tuple(int(x) for x in t) + (1,) * (3 - len(t))
    return t  # type: ignore[return-value]


def _scalar(code: str, value, index: int, kernel: str):
    ctype = _SCALARS.get(code)
    if ctype is None:
        raise EmulationError(f"{kernel}: argument {index} has a type ({code}) the harness cannot pass")
    if code.startswith("f"):
        if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
            raise EmulationError(f"{kernel}: argument {index} must be a number ({code}), got {value!r}")
        return ctype(float(value))
    if isinstance(value, (float, np.floating)) or not isinstance(value, (int, np.integer, bool, np.bool_)):
        raise EmulationError(f"{kernel}: argument {index} must be an integer ({code}), got {value!r}")
    v = int(value)
    if code != "b8":
        bits = int(code[1:])
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if code[0] == "i" else (0, (1 << bits) - 1)
        if not lo <= v <= hi:
            raise EmulationError(f"{kernel}: argument {index} = {v} does not fit {code}")
    return ctype(v)


_modules: dict[tuple, Module] = {}
_lock = threading.Lock()


def load(path: str | os.PathLike, defines: dict[str, Any] | None = None,
         include_dirs: Sequence[str | os.PathLike] = ()) -> Module:
    """Compile (or fetch from the cache) and load a kernel file for emulation."""
    p = Path(path).resolve()
    key = (str(p), p.stat().st_mtime_ns, tuple(sorted((defines or {}).items())), tuple(map(str, include_dirs)))
    with _lock:
        if key not in _modules:
            lib, names = compile_shared_library(p, defines, [Path(d) for d in include_dirs])
            _modules[key] = Module(p, lib, names)
        return _modules[key]


def run_schedules(fn: Callable[[str], Any], schedules: Sequence[str] = ("forward", "reverse", "random")) -> Any:
    """Call fn(schedule) for each schedule; raise EmulationError unless all results are bitwise equal.

    fn returns a tensor/array or a tuple of them; the first schedule's result is returned."""
    results = [(s, fn(s)) for s in schedules]
    first_s, first = results[0]
    for s, r in results[1:]:
        for i, (a, b) in enumerate(zip(_as_tuple(first), _as_tuple(r), strict=True)):
            if not _bitwise_equal(a, b):
                raise EmulationError(f"output {i} differs between schedule {first_s!r} and {s!r}: "
                                     "the kernel depends on thread or block order (a race)")
    return first


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _bitwise_equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if not isinstance(a, np.ndarray):
        import torch
        a = a.detach().contiguous().view(torch.uint8).numpy() if a.dtype != torch.bool else a.numpy()
        b = b.detach().contiguous().view(torch.uint8).numpy() if b.dtype != torch.bool else b.numpy()
    return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


class EmulationBackend:
    """Launches kernels from kernels/<file>.cu on CPU tensors, like cupy_launch.CupyBackend on CUDA.

    Python numbers are checked the way CuPy will pass them: an int must meet a 32-bit integer
    parameter and a float a float parameter (CuPy sends int32 and float32); pass np.int64 /
    np.float64 for 64-bit parameters. `multiprocessors` is what `sm_count` reports, so grids
    sized "per multiprocessor" stay small here."""

    device_type = "cpu"

    def __init__(self, schedule: str = "forward", seed: int = 0, multiprocessors: int = 3):
        self.schedule = schedule
        self.seed = seed
        self.multiprocessors = multiprocessors
        self.launches: list[str] = []  # kernel names, in launch order (tests check which path ran)

    def sm_count(self, device=None) -> int:
        return self.multiprocessors

    def launch(self, source: str, name: str, grid, block, args: Sequence[Any], shared_bytes: int = 0) -> None:
        mod = load(KERNELS_DIR / source)
        kernel = mod.kernels.get(name)
        if kernel is not None:
            # a wrong argument count is Module.launch's to report, with the signature in its message
            for i, (code, a) in enumerate(zip(kernel.signature, args, strict=False)):
                if isinstance(a, (bool, int)) and code not in ("i32", "u32", "b8"):
                    raise EmulationError(f"{name}: argument {i} is a Python int, which CuPy passes as int32, "
                                         f"but the kernel takes {code}: pass a numpy scalar of that type")
                if isinstance(a, float) and code != "f32":
                    raise EmulationError(f"{name}: argument {i} is a Python float, which CuPy passes as float32, "
                                         f"but the kernel takes {code}: pass a numpy scalar of that type")
        self.launches.append(name)
        # like CupyBackend, which raises a kernel's limit past 48 KiB when a launch asks for more
        limit = 48 * 1024 if shared_bytes <= 48 * 1024 else 232448
        mod.launch(name, grid, block, list(args), shared_bytes, schedule=self.schedule, seed=self.seed,
                   max_shared_bytes=limit)

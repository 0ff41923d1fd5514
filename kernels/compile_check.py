"""Compile every kernels/*.cu with nvcc for sm_80 and sm_90 and report registers and spills.

    python -m workbench.kernels.compile_check                  # all files, sm_80 and sm_90
    python -m workbench.kernels.compile_check --arch sm_90 kernels/rmsnorm.cu

Builds a cubin per file and architecture (`nvcc -cubin -Xptxas -v`) from the same text CuPy
compiles at run time (`nvrtc_source`: the file with its local headers pasted in), and prints one
line per kernel: registers, spill stores/loads (bytes) and stack frame. Exits 1 if any file fails
to compile, 0 otherwise (spills are reported, not fatal: they cost speed, not correctness).
No GPU is needed, only the CUDA toolkit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent
ARCHS = ("sm_80", "sm_90")
NVCC_FLAGS = ["-std=c++17", "-Xptxas", "-v"]


@dataclass(frozen=True)
class KernelReport:
    file: str
    arch: str
    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int


class CompileError(RuntimeError):
    pass


def nvcc() -> str | None:
    """The nvcc to use: $NVCC, then PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


def nvrtc_source(source: str | Path) -> str:
    """A kernel file with its local includes ("common.h") pasted in, as CuPy gets it.

    One self-contained text: CuPy's on-disk kernel cache keys on the source text only, so a
    changed header must change the text; #line directives keep error messages pointing at the
    right file and line."""
    seen: set[str] = set()

    def expand(path: Path) -> str:
        lines = path.read_text().splitlines()
        out = [f'#line 1 "{path.name}"']
        for number, line in enumerate(lines, 1):
            m = _LOCAL_INCLUDE.match(line)
            if m and (path.parent / m.group(1)).is_file():
                name = m.group(1)
                if name not in seen:
                    seen.add(name)
                    out.append(expand(path.parent / name))
                out.append(f'#line {number + 1} "{path.name}"')
            elif line.strip() != "#pragma once":
                out.append(line)
        return "\n".join(out)

    path = Path(source)
    return expand(path if path.is_file() else KERNELS_DIR / path) + "\n"


def kernel_files() -> list[Path]:
    return sorted(KERNELS_DIR.glob("*.cu"))


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str, file: str) -> list[KernelReport]:
    reports, current, frame = [], None, (0, 0, 0)
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current, frame = (m.group(1), m.group(2)), (0, 0, 0)
        elif (m := _FRAME.search(line)) and current:
            frame = tuple(int(g) for g in m.groups())
        elif (m := _REGS.search(line)) and current:
            reports.append(KernelReport(file, current[1], current[0], int(m.group(1)),
                                        frame[1], frame[2], frame[0]))
            current = None
    return reports


def compile_file(path: Path, arch: str, compiler: str | None = None) -> list[KernelReport]:
    compiler = compiler or nvcc()
    if compiler is None:
        raise CompileError("nvcc not found (set NVCC or CUDA_HOME, or put it on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        # the very text CuPy compiles: the file with its local headers pasted in
        src = Path(tmp) / path.name
        src.write_text(nvrtc_source(path))
        out = Path(tmp) / f"{path.stem}.{arch}.cubin"
        proc = subprocess.run([compiler, "-cubin", f"-arch={arch}", *NVCC_FLAGS, str(src), "-o", str(out)],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        errors = [line for line in text.splitlines() if "error" in line] or text.strip().splitlines()[-5:]
        raise CompileError(f"{path.name} ({arch}): " + "\n".join(errors))
    return parse_ptxas(text, path.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.kernels.compile_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="kernel files (default: every kernels/*.cu)")
    parser.add_argument("--arch", action="append", help="a GPU architecture, repeatable (default: sm_80 and sm_90)")
    args = parser.parse_args(argv)
    compiler = nvcc()
    if compiler is None:
        print("error: nvcc not found (set NVCC or CUDA_HOME, or put it on PATH)", file=sys.stderr)
        return 1
    files = args.files or kernel_files()
    failed = 0
    print(f"{'file':<24} {'arch':<6} {'kernel':<34} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'stack':>6}")
    for path in files:
        for arch in args.arch or ARCHS:
            try:
                reports = compile_file(path, arch, compiler)
            except CompileError as e:
                failed += 1
                print(f"error: {e}", file=sys.stderr)
                continue
            for r in reports:
                flag = "  <- spills" if r.spill_stores or r.spill_loads else ""
                print(f"{r.file:<24} {r.arch:<6} {r.kernel:<34} {r.registers:>5} {r.spill_stores:>9} "
                      f"{r.spill_loads:>9} {r.stack_frame:>6}{flag}")
    if failed:
        print(f"error: {failed} compilation(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

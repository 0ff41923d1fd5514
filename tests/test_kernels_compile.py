"""Every kernels/*.cu compiles with nvcc for sm_80 (A100) and sm_90 (H100), no GPU needed.

The build's registers and spills per kernel are printed (run pytest with -s to see them, or
`python -m workbench.kernels.compile_check`).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from workbench.kernels import compile_check

NVCC = compile_check.nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed: "
                                                      "set NVCC or CUDA_HOME to run the compile checks")
FILES = compile_check.kernel_files()
# ours must not spill: a spill in these memory-bound kernels is a slowdown worth a look
NO_SPILLS = {"rmsnorm.cu", "rope.cu", "swiglu.cu"}


@pytest.mark.parametrize("arch", compile_check.ARCHS)
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_kernel_file_compiles(path, arch):
    reports = compile_check.compile_file(path, arch, NVCC)
    source = path.read_text()
    assert reports, f"{path.name}: ptxas reported no kernels"
    for r in reports:
        print(f"{r.file} {r.arch} {r.kernel}: {r.registers} registers, "
              f"{r.spill_stores}/{r.spill_loads} bytes spilled (stores/loads), {r.stack_frame} bytes stack")
        assert r.arch == arch and 0 < r.registers <= 255
        assert r.kernel.split("_")[0] in source  # a kernel of this file, by its extern "C" name
        if path.name in NO_SPILLS:
            assert r.spill_stores == 0 and r.spill_loads == 0, f"{r.kernel} spills on {arch}"


def test_compile_check_command(tmp_path):
    good = subprocess.run([sys.executable, "-m", "workbench.kernels.compile_check", "--arch", "sm_90",
                           str(compile_check.KERNELS_DIR / "swiglu.cu")], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "swiglu_fwd_bf16_v8" in good.stdout and "regs" in good.stdout
    bad = tmp_path / "broken.cu"
    bad.write_text('extern "C" __global__ void k(float* x) { x[0] = not_declared; }\n')
    out = subprocess.run([sys.executable, "-m", "workbench.kernels.compile_check", "--arch", "sm_80", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "error: broken.cu (sm_80)" in out.stderr and "not_declared" in out.stderr

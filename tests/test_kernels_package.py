"""The kernels package's edges: select() and its error, the engine's report of it, launch arguments,
CPU tensors refused without the emulation, and no import from workbench.engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kernel_cases
import pytest
import torch
from engine_helpers import cli_env, tiny_raw, workbench, write_toml
from kernel_cases import cupy_only

from workbench.kernels import KernelsUnavailable, select
from workbench.kernels.cupy_launch import cupy_missing

backend = kernel_cases.backend  # the fixture: "emulated", and "cupy" under -m gpu

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
CUPY_ON_CPU = 'kernels = "cupy" needs a CUDA device; use "auto" or "torch" on the CPU'


# ---------------------------------------------------------------- select
def test_select_gives_the_references_on_the_cpu_and_refuses_cupy_there():
    assert select("torch", "cpu").name == "torch"
    auto = select("auto", "cpu")
    assert auto.name == "torch" and "the device is cpu, not CUDA" in auto.reason
    with pytest.raises(KernelsUnavailable, match=CUPY_ON_CPU):
        select("cupy", "cpu")
    with pytest.raises(KernelsUnavailable, match="train.kernels must be auto, cupy or torch, got 'fast'"):
        select("fast", "cpu")
    assert issubclass(KernelsUnavailable, ValueError)


@pytest.mark.skipif(cupy_missing() is None, reason="the CuPy kernels can load here")
def test_select_on_cuda_without_cupy_falls_back_under_auto_only():
    auto = select("auto", "cuda")
    assert auto.name == "torch" and "CuPy kernels unavailable" in auto.reason
    with pytest.raises(KernelsUnavailable, match='kernels = "cupy" but the CuPy kernels cannot load: '):
        select("cupy", "cuda")


@cupy_only
def test_select_gives_the_cupy_kernels_on_cuda(backend):
    assert select("cupy", backend.device.type).name == "cupy"
    assert select("auto", backend.device.type).name == "cupy"


def test_the_engine_reports_kernels_unavailable_as_a_one_line_config_error(tiny_data, tmp_path):
    config = write_toml(tmp_path / "c.toml", tiny_raw(train={"kernels": "cupy"}))  # tiny_raw trains on the CPU
    result = workbench("train", config, "--data", tiny_data, "--run", tmp_path / "run")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: {CUPY_ON_CPU}"], result.stderr


# ---------------------------------------------------------------- launches
def test_cpu_tensors_are_refused_without_the_emulation():
    from workbench.kernels.adamw import AdamW
    from workbench.kernels.linear_cross_entropy import linear_cross_entropy_cupy
    from workbench.kernels.rmsnorm import add_rms_norm_cupy

    refused = "run on CUDA tensors, got a tensor on cpu"
    with pytest.raises(ValueError, match=refused):
        add_rms_norm_cupy(torch.randn(4, 8), None, torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match=refused):
        linear_cross_entropy_cupy(torch.randn(8, 4), torch.randn(10, 4), torch.zeros(8, dtype=torch.int64))
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    with pytest.raises(ValueError, match=refused):
        AdamW([p]).step()


def test_kernel_arguments_get_explicit_sizes_for_cupy():
    import numpy as np

    from workbench.kernels.cupy_launch import kernel_arg

    t = torch.zeros(3)
    assert kernel_arg(t) == np.uint64(t.data_ptr()) and kernel_arg(t).dtype == np.uint64
    assert kernel_arg(None) == 0 and kernel_arg(None).dtype == np.uint64
    assert kernel_arg(7).dtype == np.int32 and kernel_arg(True).dtype == np.int32
    assert kernel_arg(0.5).dtype == np.float32
    assert kernel_arg(np.int64(5)).dtype == np.int64
    with pytest.raises(ValueError, match="does not fit int32"):
        kernel_arg(1 << 40)


# ---------------------------------------------------------------- kernels/ imports nothing from engine/
def imported_modules(source: str, package: str) -> set[str]:
    """Every module a file of `package` imports, anywhere in it (lazy imports in functions too), with
    relative imports resolved; `from a import b` counts as a.b too, since b may be a module."""
    parts = package.split(".")
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def is_engine(module: str) -> bool:
    return module == "workbench.engine" or module.startswith(("workbench.engine.", "engine.")) or module == "engine"


def test_the_import_check_resolves_relative_and_lazy_imports():
    source = "from .. import engine\nimport numpy\ndef f():\n    from ..engine.errors import ConfigError\n"
    found = imported_modules(source, "workbench.kernels")
    assert {"workbench.engine", "workbench.engine.errors", "numpy"} <= found
    assert not any(map(is_engine, imported_modules("from . import cupy_launch\n", "workbench.kernels")))
    assert is_engine(next(iter(imported_modules("import workbench.engine.train\n", "workbench.kernels"))))


def test_no_kernels_source_imports_the_engine():
    files = sorted(KERNELS_DIR.rglob("*.py"))
    assert KERNELS_DIR / "__init__.py" in files and KERNELS_DIR / "emulation" / "harness.py" in files
    offenders = []
    for path in files:
        package = ".".join(["workbench", "kernels", *path.relative_to(KERNELS_DIR).parent.parts])
        offenders += [f"{path.name}: {m}" for m in imported_modules(path.read_text(), package) if is_engine(m)]
    assert not offenders


def test_importing_every_kernels_module_loads_no_engine_module():
    script = """
import importlib, pkgutil, sys
import workbench.kernels as kernels
names = [m.name for m in pkgutil.walk_packages(kernels.__path__, "workbench.kernels.")]
for name in names:
    importlib.import_module(name)
print(len(names), sorted(m for m in sys.modules if m.startswith("workbench.engine")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    count, engine = result.stdout.strip().split(" ", 1)
    assert int(count) >= 8  # cupy_launch, rmsnorm, rope, swiglu, linear_cross_entropy, adamw, compile_check, emulation
    assert engine == "[]"

"""The package layout: one import namespace, every package installed, commands reachable."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"workbench": "workbench", "engine": "workbench.engine", "kernels": "workbench.kernels"}


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_nothing_named_engine_or_kernels_at_the_top_level(tmp_path):
    probe = ("import importlib.util, workbench.engine, workbench.kernels; "
             "print(importlib.util.find_spec('engine'), importlib.util.find_spec('kernels'), "
             "workbench.engine.__name__, workbench.kernels.__name__)")
    out = run_python(["-c", probe], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None", "workbench.engine", "workbench.kernels"]


def test_every_package_folder_is_installed():
    with open(ROOT / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert setuptools["package-dir"] == {name: folder for folder, name in FOLDERS.items()}
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert set(setuptools["packages"]) == found


def test_a_checkout_runs_without_an_install(tmp_path):
    # -S: no site-packages, so no editable-install finder; only PYTHONPATH=<checkout> (as on a bare GPU box)
    probe = "import workbench.engine.events, workbench.engine.errors; print(workbench.engine.events.__file__)"
    out = run_python(["-S", "-c", probe], tmp_path, PYTHONPATH=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "engine" / "events.py"


def test_module_entry_points(tmp_path):
    for module in ("workbench.engine", "workbench.engine.process", "workbench.kernels.compile_check"):
        out = run_python(["-m", module, "--help"], tmp_path)
        assert out.returncode == 0 and "usage:" in out.stdout, (module, out.stderr)

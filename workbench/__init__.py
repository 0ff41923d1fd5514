"""workbench: train small chat models end to end, from a terminal.

One import namespace: the TUI is `workbench`, the headless engine `workbench.engine` and the
CUDA kernels `workbench.kernels`. In the repository they are the top-level folders workbench/,
engine/ and kernels/; pyproject.toml's package-dir maps them into this namespace for an install.
Run straight from a checkout (PYTHONPATH=., as on a bare GPU box), the same names resolve
through the extra search path below.
"""

from pathlib import Path as _Path

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "engine" / "__init__.py").is_file():
    # workbench.engine -> <checkout>/engine, workbench.kernels -> <checkout>/kernels
    __path__.append(str(_checkout))  # noqa: F821 (a package's __path__ exists at import time)
del _Path, _checkout

"""The `workbench` console script.

With no arguments it opens the TUI. With a subcommand it runs the headless engine
command line in this process; that import (and torch with it) happens only then,
so the TUI itself never loads torch.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from workbench.app import run_app

        return run_app()
    from workbench.engine.cli import main as engine_main

    return engine_main(argv)


if __name__ == "__main__":
    sys.exit(main())

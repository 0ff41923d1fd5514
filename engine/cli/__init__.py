"""The headless command line: `workbench prepare|train|sample|eval|quickstart|...`.

Each subcommand is one module of this package; this file only routes.
A module exposes `add_arguments(parser)` and `run(args) -> int`. User-caused
failures (`WorkbenchError`, OSError such as a full disk) end in one line on stderr
and a non-zero exit; nothing else is caught, so bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from workbench.engine.errors import WorkbenchError
from workbench.engine.process.ops import OPS

# subcommand -> (module, one-line help)
COMMANDS = {
    "prepare": ("workbench.engine.cli.prepare", "clean, filter, dedup and tokenize text into token shards"),
    "train": ("workbench.engine.cli.train", "train a model (or --resume a run, or --init-from a checkpoint)"),
    "sample": ("workbench.engine.cli.sample", "generate text from a run's checkpoint"),
    "chat": ("workbench.engine.cli.chat", "multi-turn chat with a run's checkpoint, streamed (a pipe: JSON lines)"),
    "serve": ("workbench.engine.cli.serve", "a warm chat service: the run's socket, and an OpenAI-compatible API"),
    "eval": ("workbench.engine.cli.eval", "validation loss, perplexity, bits per byte and the worst documents"),
    "quickstart": ("workbench.engine.cli.quickstart", "prepare the built-in corpus and train a tiny model"),
    "ls": ("workbench.engine.cli.runs", "list runs with state, step, losses, tokens/s, device and age"),
    "attach": ("workbench.engine.cli.attach", "live plain-text view of a run: its history, then live events"),
    # status, pause, resume, save, stop, set: one request each, from the engine's table of ops
    **{op: ("workbench.engine.cli.control", spec.help) for op, spec in OPS.items() if spec.command},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Train small language models end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"error: disk full while writing {e.filename or 'output'}; nothing saved earlier was touched",
                  file=sys.stderr)
        elif e.errno == errno.EFBIG:  # RLIMIT_FSIZE (`ulimit -f`) or the filesystem's largest file
            print(f"error: file too large while writing {e.filename or 'output'} (over the file size limit, "
                  "see `ulimit -f`); nothing saved earlier was touched", file=sys.stderr)
        else:
            print(f"error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

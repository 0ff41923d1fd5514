"""`workbench attach RUN`: a plain-text live view of a run, its history first, then live events.

It only reads events.jsonl, so it never slows or stops the run: Ctrl-C detaches and
the engine goes on. It ends by itself once the run's engine has ended. Events come
through the client's follow (workbench.engine.events.EventReader), so an older run's
history reads like a new one's.
"""

from __future__ import annotations

import sys

from workbench.engine.errors import WorkbenchError
from workbench.engine.formatting import format_event
from workbench.engine.process.client import follow, run_state
from workbench.engine.rundir import RunDir


def add_arguments(parser) -> None:
    parser.add_argument("run", help="the run folder, e.g. runs/tiny")
    parser.add_argument("--system", action="store_true", help="also show system (CPU/GPU) stats events")
    parser.add_argument("--live", action="store_true", help="skip the history; show only what happens from now")


def run(args) -> int:
    run_dir = RunDir.at(args.run)
    if not run_dir.root.is_dir() or not (run_dir.exists() or run_dir.events.exists()):
        raise WorkbenchError(f"no run at {run_dir.root}")
    offset = run_dir.events.stat().st_size if args.live and run_dir.events.exists() else 0
    out = sys.stdout
    try:
        for event in follow(run_dir, offset, poll=0.25, until_done=True):
            if event["type"] == "system" and not args.system:
                continue
            line = format_event(event, clock=True)
            if line is not None:
                out.write(line + "\n")
                out.flush()
    except KeyboardInterrupt:
        print("\ndetached; the run goes on", file=sys.stderr)
        return 0
    except BrokenPipeError:  # `workbench attach RUN | head`
        return 0
    print(f"-- {run_dir.name} is {run_state(run_dir)} (no engine running)", file=sys.stderr)
    return 0

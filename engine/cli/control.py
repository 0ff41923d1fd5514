"""`workbench status|pause|resume|save|stop RUN` and `workbench set RUN key=value ...`.

Each sends one request to the run's engine over its control socket and prints the
answer in a line. `status` also answers for a run with no engine (from its events).
"""

from __future__ import annotations

from workbench.engine.config import _parse_value
from workbench.engine.errors import WorkbenchError
from workbench.engine.process import client
from workbench.engine.process.ops import OPS, SETTABLE
from workbench.engine.rundir import RunDir


def _command(parser) -> str:
    return parser.prog.rsplit(" ", 1)[-1]  # the router names each subparser "workbench <command>"


def add_arguments(parser) -> None:
    parser.add_argument("run", help="the run folder, e.g. runs/tiny")
    if _command(parser) == "set":
        parser.add_argument("assignments", nargs="+", metavar="key=value", help="settable live: " + "; ".join(
            f"{key} ({s.help})" for key, s in SETTABLE.items()))
    else:
        parser.add_argument("--json", action="store_true", help="print the engine's reply as JSON")


def parse_assignments(items: list[str]) -> dict:
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise WorkbenchError(f"set expects key=value, got {item!r}")
        key = key.strip()
        if key not in SETTABLE:
            raise WorkbenchError(f"cannot set {key!r} live (settable: {', '.join(SETTABLE)})")
        values[key] = _parse_value(text.strip())
    return values


def _offline_status(run: RunDir) -> int:
    s = client.run_summary(run)
    step = "" if s["step"] is None else f", step {s['step']}/{s['max_steps'] or '?'}"
    print(f"{run.name}: {s['state']}{step} (no engine running)")
    return 0


def run(args) -> int:
    import json

    command = args.command
    run_dir = RunDir.at(args.run)
    if not run_dir.root.is_dir():
        raise WorkbenchError(f"no run at {run_dir.root}")
    if command == "status" and not client.engine_alive(run_dir):
        return _offline_status(run_dir)
    extra = {"values": parse_assignments(args.assignments)} if command == "set" else {}
    reply = client.request(run_dir, command, timeout=OPS[command].timeout_s, **extra)
    if getattr(args, "json", False):
        print(json.dumps(reply))
        return 0
    name = run_dir.name
    if command == "status":
        settings = ", ".join(f"{k} {v}" for k, v in (reply.get("settings") or {}).items())
        print(f"{name}: {reply['state']}, step {reply.get('step')}/{reply.get('max_steps', '?')}, "
              f"pid {reply['pid']}" + (f"; {settings}" if settings else ""))
    elif command in ("pause", "resume"):
        print(f"{name}: {reply['state']} at step {reply['step']}")
    elif command == "save":
        print(f"{name}: saved {reply['checkpoint']} at step {reply['step']}")
    elif command == "stop":
        print(f"{name}: {reply['state']} at step {reply['step']} (final checkpoint written)")
    elif command == "set":
        print(f"{name}: " + ", ".join(f"{k} = {v}" for k, v in reply["settings"].items()))
    return 0

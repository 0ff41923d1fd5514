"""`workbench attach RUN`: a plain-text live view of a run, its history first, then live events.

It only reads events.jsonl, so it never slows or stops the run: Ctrl-C detaches and
the engine goes on. It ends by itself once the run's engine has ended.
"""

from __future__ import annotations

import sys
import time

from engine.client import follow, run_state
from engine.errors import WorkbenchError
from engine.estimates import human
from engine.rundir import RunDir


def add_arguments(parser) -> None:
    parser.add_argument("run", help="the run folder, e.g. runs/tiny")
    parser.add_argument("--system", action="store_true", help="also show system (CPU/GPU) stats events")
    parser.add_argument("--live", action="store_true", help="skip the history; show only what happens from now")


def _fmt(value, spec: str) -> str:
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    h, m = divmod(int(round(seconds)), 3600)
    return f"{h}:{m // 60:02d}:{m % 60:02d}" if h else f"{m // 60}:{m % 60:02d}"


def _gb(n) -> str:
    return "?" if n is None else f"{n / 2**30:.1f}"


def format_event(event: dict) -> str | None:
    """One readable line (or a few) for an event; None for events not worth a line."""
    kind = event.get("type")
    clock = time.strftime("%H:%M:%S", time.localtime(event.get("t", 0)))
    e = event
    if kind == "step":  # the same line as the foreground `workbench train` prints
        parts = [f"step {e.get('step')}/{e.get('max_steps', '?')}"]
        for key, label, spec in (("loss", "loss", ".4f"), ("lr", "lr", ".2e"), ("grad_norm", "gnorm", ".2f")):
            if e.get(key) is not None:
                parts.append(f"{label} {_fmt(e[key], spec)}")
        if e.get("tokens_per_s") is not None:
            parts.append(f"{human(e['tokens_per_s'])} tok/s")
        parts.append("MFU n/a" if e.get("mfu") is None else f"MFU {_fmt(100 * e['mfu'], '.1f')}%")
        if e.get("eta_s") is not None:
            parts.append(f"ETA {_duration(e['eta_s'])}")
        return f"{clock} " + " | ".join(parts)
    if kind == "eval":
        metrics = [f"{k} {_fmt(v, '.4f')}" for k, v in e.items()
                   if k not in ("v", "t", "type", "step", "worst") and isinstance(v, (int, float))]
        return f"{clock} eval @ step {e.get('step')}: " + "  ".join(metrics)
    if kind == "sample":
        return f"{clock} sample @ step {e.get('step')}: {e.get('prompt', '')!s}{e.get('text', '')!s}"
    if kind == "checkpoint":
        return f"{clock} checkpoint @ step {e.get('step')}: {e.get('path', e.get('name', ''))}"
    if kind == "state":
        return f"{clock} state: {e.get('state')}" + (f" (step {e['step']})" if e.get("step") is not None else "")
    if kind == "log":
        return f"{clock} {e.get('level', 'info')}: {e.get('message', '')}"
    if kind == "error":
        text = f"{clock} ERROR: {e.get('message', '')}"
        return text + ("\n" + e["traceback"].rstrip() if e.get("traceback") else "")
    if kind == "system":
        gpus = "  ".join(f"gpu{g.get('index')} {g.get('util_percent', '?')}% {_gb(g.get('mem_used_bytes'))}/"
                         f"{_gb(g.get('mem_total_bytes'))} GB {g.get('temp_c', '?')}C {g.get('power_w', '?')}W"
                         for g in e.get("gpus") or [])
        return (f"{clock} system: cpu {_fmt(e.get('cpu_percent'), '.0f')}% (machine "
                f"{_fmt(e.get('machine_cpu_percent'), '.0f')}%)  rss {_gb(e.get('rss_bytes'))} GB  ram "
                f"{_gb(e.get('ram_used_bytes'))}/{_gb(e.get('ram_total_bytes'))} GB" + (f"  {gpus}" if gpus else ""))
    return None


def run(args) -> int:
    run_dir = RunDir.at(args.run)
    if not run_dir.root.is_dir() or not (run_dir.exists() or run_dir.events.exists()):
        raise WorkbenchError(f"no run at {run_dir.root}")
    offset = run_dir.events.stat().st_size if args.live and run_dir.events.exists() else 0
    out = sys.stdout
    try:
        for event in follow(run_dir, offset, poll=0.25, until_done=True):
            if event.get("type") == "system" and not args.system:
                continue
            line = format_event(event)
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

"""Helpers for the engine tests: a tiny run config and the real `workbench` command in a subprocess."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from workbench.engine import config as config_mod

REPO = Path(__file__).resolve().parent.parent

# Two layers, 32 wide, 32 tokens of context: a training step takes a few milliseconds on one core.
TINY = {
    "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32},
    "optim": {"lr": 3e-3, "warmup_steps": 4, "min_lr_ratio": 0.1},
    "train": {"batch_size": 4, "max_steps": 20, "device": "cpu", "log_interval": 1, "seed": 7},
    "eval": {"interval": 10, "max_batches": 2, "sample_interval": 0, "worst_docs": 3},
    "checkpoint": {"interval": 10, "keep_last": 2},
}


def tiny_raw(data: Path | str | None = None, **sections: dict) -> dict:
    raw = json.loads(json.dumps(TINY))
    if data is not None:
        raw["data"] = {"path": str(data)}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def tiny_config(data: Path | str, **sections: dict) -> config_mod.RunConfig:
    return config_mod.from_dict(tiny_raw(data, **sections))


def write_toml(path: Path, raw: dict) -> Path:
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def workbench(*args: str, cwd: Path | None = None, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    """Run the real command line (`python -m workbench.cli ...`) and wait for it."""
    return subprocess.run([sys.executable, "-m", "workbench.cli", *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout, **popen)


def workbench_popen(*args: str, cwd: Path | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workbench.cli", *map(str, args)], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def file_size_limit(limit: int):
    """A preexec_fn: the child's writes past `limit` bytes fail with EFBIG, as a full disk fails them
    (SIGXFSZ, which would kill it instead, is ignored). Only the soft limit is lowered, so a test
    can lift it again in the running child with resource.prlimit, as if space had been freed."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def engine_popen(*args: str, cwd: Path | None = None, **popen) -> subprocess.Popen:
    """`python -m workbench.engine ...` (the engine's own command line) in a child process."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([sys.executable, "-m", "workbench.engine", *map(str, args)], cwd=cwd, env=cli_env(),
                            **popen)


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"  # two busy cores: one thread per process keeps the tests predictable
    return env


def events_of(run: Path, kind: str | None = None) -> list[dict]:
    from workbench.engine.events import read_events

    events, _ = read_events(Path(run) / "events.jsonl")
    return [e for e in events if kind is None or e["type"] == kind]


def step_losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events_of(run, "step")}


def wait_for(predicate, timeout: float = 30.0, every: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")

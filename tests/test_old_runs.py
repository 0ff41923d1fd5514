"""A run written by the previous release (v1 events; tests/fixtures/v1_run, see its README) still
lists, attaches, samples, evaluates and shows in the TUI: the real command line in subprocesses,
the TUI's history reader and its dashboard, all on a copy of the fixture."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import cli_env

from workbench.engine import events
from workbench.engine.events import read_events
from workbench.history import RunHistory

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v1_run"
FINAL_LOSS, FINAL_VAL = "4.9126", "4.9470"  # the run's last step and eval, as v1 wrote them


@pytest.fixture
def old(tmp_path) -> Path:
    """A copy of the fixture whose config.toml points at the copy's data (see the README)."""
    root = tmp_path / "v1"
    shutil.copytree(FIXTURE, root)
    config = root / "runs" / "old" / "config.toml"
    text, edits = re.subn(r'(?m)^path = ".*"$', f"path = {json.dumps(str(root / 'data'))}", config.read_text())
    assert edits == 1  # the [data] path line, the only one
    config.write_text(text)
    return root


def engine(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m workbench.engine ARGS`, the engine's own command line, run in the fixture copy."""
    return subprocess.run([sys.executable, "-m", "workbench.engine", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=180)


def test_the_fixture_is_a_v1_run():
    lines = (FIXTURE / "runs" / "old" / "events.jsonl").read_text().splitlines()
    stored = [json.loads(line) for line in lines]
    assert {e["v"] for e in stored} == {1}
    assert {e["type"] for e in stored} == {"state", "log", "step", "eval", "sample", "system", "checkpoint"}
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 400_000


def test_ls_lists_it_with_its_device(old):
    out = engine("ls", "runs", cwd=old)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split() == ["NAME", "STATE", "STEP", "TRAIN", "VAL", "TOK/S", "DEVICE", "AGE"]
    assert row.split()[:6] == ["old", "finished", "40/40", FINAL_LOSS, FINAL_VAL, "35.1k"]
    assert "cpu (1 thread)" in row  # from its v1 device line, through upgrade_v1


def test_attach_prints_its_history(old):
    out = engine("attach", "runs/old", "--system", cwd=old)
    assert out.returncode == 0, out.stderr
    lines = [line.split(" ", 1)[1] for line in out.stdout.splitlines()]  # without the clock
    assert lines[0] == "state: starting" and lines[-1] == "state: finished"
    assert "device: cpu (1 thread), float32, peak 128GFLOP/s" in lines
    assert sum(line.startswith("step ") for line in lines) == 8
    assert f"step 40/40 | loss {FINAL_LOSS} | lr 3.05e-04 | gnorm 0.392 | 35.1k tok/s | MFU 1.9% | ETA 0s" in lines
    assert f"eval step 40 | val loss {FINAL_VAL} | ppl 140.75 | bpb 4.7264" in lines
    assert "saved checkpoints/step_000040" in lines
    system = [line for line in lines if line.startswith("system: ")]
    assert len(system) == 3 and system[0].startswith("system: cpu 100% (engine 42%)  rss 331MiB  ram ")
    assert out.stderr == "-- old is finished (no engine running)\n"


def test_sample_from_its_checkpoint(old):
    out = engine("sample", "runs/old", "--prompt", "x", "--max-tokens", "8", "--seed", "1", cwd=old)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("x") and len(out.stdout.strip()) > 1


def test_eval_its_checkpoint(old):
    out = engine("eval", "runs/old", cwd=old)
    assert out.returncode == 0, out.stderr
    first, metrics = out.stdout.splitlines()[:2]
    assert first == "run runs/old, checkpoint step_000040 (step 40)"
    assert re.fullmatch(r"val loss 4\.9\d+ \| perplexity 1\d\d\.\d\d \| bits per byte 4\.\d+ \| 5,376 tokens", metrics)


def test_the_tui_history_reads_it(old):
    stored = (old / "runs" / "old" / "events.jsonl").read_text().splitlines()
    read, _ = read_events(old / "runs" / "old" / "events.jsonl")
    assert len(read) == len(stored)  # not one line lost to the upgrade
    for event in read:
        events.check(event)  # every one an exact v2 event
    history = RunHistory()
    history.ingest(read)
    view = history.view()
    assert view.state == "finished" and view.n_steps == 8 and view.max_steps == 40
    assert view.latest["step"] == 40 and f"{view.latest['loss']:.4f}" == FINAL_LOSS
    assert [round(v, 4) for v in view.val_loss] == [5.1915, 4.947] and list(view.eval_steps) == [20, 40]
    assert view.cpu == [100.0, 100.0, 99.5]  # the machine's share (v1 machine_cpu_percent), not the engine's
    assert [c["path"] for c in view.checkpoints] == ["checkpoints/step_000040"] and len(view.samples) == 2
    running = [e for e in read if e["type"] == "state" and e["state"] == "running"]
    assert running == [{**running[0], "device": "cpu (1 thread)", "dtype": "float32", "kernels": "torch"}]


def test_the_dashboard_shows_it(old):
    from textual.widgets import Label

    from workbench.screens.dashboard import DashboardScreen
    from workbench.screens.standalone import ScreenApp

    seen = {}

    async def main():
        app = ScreenApp(lambda: DashboardScreen(old / "runs" / "old"))
        async with app.run_test(size=(100, 30)) as pilot:
            screen = app.screen
            for _ in range(300):
                if screen.view is not None and screen.view.n_steps == 8 and screen.state == "finished":
                    break
                await pilot.pause(0.1)
            await pilot.pause(0.2)
            def value(row: str) -> str:
                return screen.query_one(row).query_one(".stat-value", Label).render().plain

            seen.update(status=str(screen.query_one("#status", Label).render()), loss=value("#stat-loss"),
                        val=value("#stat-val"), cpu=value("#cpu"), tps=value("#stat-tps"))

    asyncio.run(main())
    assert "finished" in seen["status"] and "step 40/40" in seen["status"] and "81.9k tok" in seen["status"]
    assert seen["loss"] == FINAL_LOSS and seen["val"] == FINAL_VAL and seen["tps"] == "35.1k"
    assert seen["cpu"] == "100%"

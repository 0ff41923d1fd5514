"""Exact resume: N steps straight == N/2 steps, stop (or kill -9), resume to N -- same losses, same weights.

Also fine-tuning from a checkpoint (--init-from) onto a new run.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import events_of, step_losses, tiny_config, tiny_raw, workbench, workbench_popen, write_toml
from safetensors.torch import load_file

from workbench.engine import checkpoint
from workbench.engine.control import StopAt
from workbench.engine.run_setup import create_run
from workbench.engine.rundir import RunDir
from workbench.engine.train import train

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def final_tensors(run: Path) -> tuple[dict, dict]:
    latest = RunDir.at(run).latest_checkpoint()
    return load_file(latest / "model.safetensors"), load_file(latest / "optimizer.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def resumed_losses(run: Path) -> dict[int, float]:
    """Step losses logged after the last `starting` state (the resumed part of the run)."""
    events = events_of(run)
    last_start = max(i for i, e in enumerate(events) if e["type"] == "state" and e["state"] == "starting")
    return {e["step"]: e["loss"] for e in events[last_start:] if e["type"] == "step"}


def test_stop_and_resume_is_exact(tiny_data, tmp_path):
    # sample_interval exercises generation mid-run: it must not disturb the training RNG or data.
    sections = {"train": {"max_steps": 24, "threads": 1}, "eval": {"interval": 6, "sample_interval": 5}}
    straight = tmp_path / "straight"
    assert train(create_run(straight, tiny_config(tiny_data, **sections)), echo=None) == "finished"

    split = tmp_path / "split"
    assert train(create_run(split, tiny_config(tiny_data, **sections)), control=StopAt(11), echo=None) == "stopped"
    assert RunDir.at(split).latest_checkpoint().name == "step_000011"
    assert train(split, resume=True, echo=None) == "finished"

    want = step_losses(straight)
    got = resumed_losses(split)
    assert sorted(got) == list(range(12, 25))
    assert got == {s: want[s] for s in got}  # bit-identical floats
    assert {s: loss for s, loss in step_losses(split).items() if s <= 11} == {s: want[s] for s in range(1, 12)}
    for a, b in zip(final_tensors(straight), final_tensors(split), strict=True):
        assert_identical(a, b)
    assert checkpoint.read_state(RunDir.at(split).latest_checkpoint())["tokens"] == 24 * 4 * 32
    # The samples at the same steps are the same text too.
    assert ({e["step"]: e["text"] for e in events_of(split, "sample")}
            == {e["step"]: e["text"] for e in events_of(straight, "sample")})


def test_kill_9_then_resume_is_exact(tiny_data, tmp_path):
    raw = tiny_raw(train={"max_steps": 240, "threads": 1}, eval={"interval": 40},
                   checkpoint={"interval": 20, "keep_last": 2})
    config = write_toml(tmp_path / "c.toml", raw)
    straight = tmp_path / "straight"
    assert train(create_run(straight, tiny_config(tiny_data, **raw)), echo=None) == "finished"

    run = tmp_path / "killed"
    proc = workbench_popen("train", config, "--data", tiny_data, "--run", run)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not events_of(run, "checkpoint") and proc.poll() is None:
            time.sleep(0.01)
        assert events_of(run, "checkpoint"), proc.communicate()[1]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert events_of(run, "state")[-1]["state"] == "running"  # killed mid-run, nothing could say goodbye
    killed_at = max(step_losses(run))
    resumed_from = checkpoint.read_state(RunDir.at(run).latest_checkpoint())["step"]
    assert 20 <= resumed_from <= killed_at < 240

    result = workbench("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert f"resumed from checkpoints/step_{resumed_from:06d} at step {resumed_from}" in result.stdout
    want = step_losses(straight)
    got = resumed_losses(run)
    assert sorted(got) == list(range(resumed_from + 1, 241))
    assert got == {s: want[s] for s in got}
    for a, b in zip(final_tensors(straight), final_tensors(run), strict=True):
        assert_identical(a, b)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


def test_resume_extends_max_steps(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert train(create_run(run, tiny_config(tiny_data, train={"max_steps": 6})), echo=None) == "finished"
    refused = workbench("train", "--resume", run)
    assert refused.returncode != 0 and "already at step 6 of 6" in refused.stderr
    result = workbench("train", "--resume", run, "--max-steps", "9")
    assert result.returncode == 0, result.stderr
    assert max(resumed_losses(run)) == 9 and min(resumed_losses(run)) == 7
    assert "max_steps = 9" in (run / "config.toml").read_text()


def test_init_from_fine_tunes_into_a_new_run(trained_run, tiny_data, tmp_path):
    base_final = step_losses(trained_run)[20]
    before = sorted(p.name for p in (trained_run / "checkpoints").iterdir())

    tuned = tmp_path / "tuned"
    result = workbench("train", "--init-from", trained_run, "--data", tiny_data, "--run", tuned,
                       "--max-steps", "5", "--set", "optim.lr=1e-3", "--set", "optim.warmup_steps=1")
    assert result.returncode == 0, result.stderr
    losses = step_losses(tuned)
    assert sorted(losses) == [1, 2, 3, 4, 5]  # a fresh step count
    # It starts from the trained weights: far below a fresh model's ln(400) = 5.99.
    assert losses[1] < base_final + 0.3 < math.log(400) - 0.5
    state = checkpoint.read_state(RunDir.at(tuned).latest_checkpoint())
    assert state["config"]["optim"]["lr"] == 1e-3 and state["step"] == 5
    source = checkpoint.read_state(RunDir.at(trained_run).latest_checkpoint())
    assert state["config"]["model"] == source["config"]["model"]
    assert "initialised weights from" in result.stdout
    # The source run was not touched.
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == before

    # A fresh optimizer: AdamW's step count restarts.
    opt = load_file(RunDir.at(tuned).latest_checkpoint() / "optimizer.safetensors")
    assert float(opt["wte.weight.step"]) == 5.0

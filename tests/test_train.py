"""The training loop on a tiny CPU model: events, schedule, batches, control hook, NaN rollback, crashes, signals."""

from __future__ import annotations

import math
import signal
import time

import numpy as np
import pytest
import torch
from engine_helpers import events_of, step_losses, tiny_config, tiny_raw, workbench, workbench_popen, write_toml
from event_fixtures import complete, fields

from workbench.engine import checkpoint
from workbench.engine.control import Control, StopAt
from workbench.engine.formatting import format_event
from workbench.engine.run_setup import create_run
from workbench.engine.rundir import RunDir
from workbench.engine.train import get_batch, lr_at, train

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_training_writes_events_checkpoints_and_run_files(tiny_data, tmp_path):
    lines = []
    cfg = tiny_config(tiny_data, eval={"sample_interval": 10, "sample_prompt": "The "})
    assert train(create_run(tmp_path / "run", cfg), echo=lines.append) == "finished"
    run = RunDir.at(tmp_path / "run")

    states = [e["state"] for e in events_of(run.root, "state")]
    assert states == ["starting", "running", "finished"]
    steps = events_of(run.root, "step")
    assert [e["step"] for e in steps] == list(range(1, 21))
    for e in steps:
        assert set(e) >= {"step", "max_steps", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu",
                          "eta_s", "elapsed_s"}
        assert e["tokens"] == e["step"] * 4 * 32 and e["tokens_per_s"] > 0 and 0 < e["mfu"] < 1
    # It learns: the loss starts near ln(vocab) and falls.
    assert abs(steps[0]["loss"] - math.log(400)) < 0.3
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    evals = events_of(run.root, "eval")
    assert [e["step"] for e in evals] == [10, 20]
    assert all(e["val_bpb"] > 0 and e["val_ppl"] == pytest.approx(math.exp(e["val_loss"])) for e in evals)
    samples = events_of(run.root, "sample")
    assert [e["step"] for e in samples] == [10, 20] and all(e["prompt"] == "The " for e in samples)
    assert [e["path"] for e in events_of(run.root, "checkpoint")] == ["checkpoints/step_000010",
                                                                     "checkpoints/step_000020"]
    logs = " ".join(e["message"] for e in events_of(run.root, "log"))
    assert "kernels: torch" in logs and "not CUDA" in logs

    # The run folder can be sampled without the data: config and tokenizer copies.
    assert run.exists() and (run.root / "tokenizer.model").read_bytes() == (tiny_data / "tokenizer.model").read_bytes()
    assert run.latest_checkpoint().name == "step_000020"
    state = checkpoint.read_state(run.latest_checkpoint())
    assert state["step"] == 20 and state["tokens"] == 20 * 128 and state["metrics"]["val_loss"] == evals[-1]["val_loss"]
    assert set(state["rng"]) == {"torch_cpu", "torch_cuda", "numpy", "python"}

    # Foreground lines: one per step in the documented format.
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == 20
    assert step_lines[-1].startswith("step 20/20 | loss ") and "| lr " in step_lines[-1]
    assert " tok/s | MFU " in step_lines[-1] and "| ETA 0s" in step_lines[-1]


def test_format_event_step_line():
    line = format_event(complete({"type": "step", "step": 100, "max_steps": 300, "loss": 3.21041, "lr": 1e-3,
                                  "grad_norm": 0.851, "tokens_per_s": 12345.0, "mfu": 0.0123, "eta_s": 42}))
    assert line == "step 100/300 | loss 3.2104 | lr 1.00e-03 | gnorm 0.851 | 12.3k tok/s | MFU 1.2% | ETA 42s"
    line = format_event(complete({"type": "step", "step": 1, "max_steps": 2, "loss": 1.0, "lr": 1.0, "grad_norm": 1.0,
                                  "tokens_per_s": 10.0, "mfu": None, "eta_s": 3700}))
    assert "MFU n/a" in line and line.endswith("ETA 1h01m")


def test_lr_schedule(tiny_data):
    cfg = tiny_config(tiny_data, optim={"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1},
                      train={"max_steps": 110})
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # cosine half way: (1 + 0.1) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)
    cfg.optim.decay = "linear"
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(35, cfg) == pytest.approx(1 - 0.25 * 0.9)
    cfg.optim.decay = "constant"
    assert lr_at(100, cfg) == 1.0


def test_batches_are_a_pure_function_of_seed_step_micro():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, 1, 5, 0, 4, 16)
    x2, y2 = get_batch(data, 1, 5, 0, 4, 16)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert x.shape == (4, 16) and x.dtype == np.int64 and np.array_equal(y, x + 1)
    assert not np.array_equal(x, get_batch(data, 1, 6, 0, 4, 16)[0])
    assert not np.array_equal(x, get_batch(data, 1, 5, 1, 4, 16)[0])
    assert not np.array_equal(x, get_batch(data, 2, 5, 0, 4, 16)[0])
    # Windows never run off the end.
    assert all(get_batch(data[:20], 0, s, 0, 8, 16)[1].max() <= 19 for s in range(50))


def test_gradient_accumulation_counts_tokens(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, train={"grad_accum": 3, "max_steps": 4}, eval={"interval": 0},
                      checkpoint={"interval": 0})
    assert train(create_run(tmp_path / "run", cfg), echo=None) == "finished"
    assert [e["tokens"] for e in events_of(tmp_path / "run", "step")] == [384, 768, 1152, 1536]


class Steering(Control):
    """Exercises every trainer hook the detached engine uses."""

    def __init__(self):
        self.results = {}

    def poll(self, trainer):
        if trainer.step == 3 and "eval" not in self.results:
            self.results["eval"] = trainer.run_eval()
            self.results["save"] = trainer.save_checkpoint()
            self.results["sample"] = trainer.sample("The ", 8, 0.0, None, 1.0, None)
            trainer.lr_scale = 0.5
            trainer.cfg.eval.interval = 4
            trainer.cfg.checkpoint.interval = 0
            trainer.emit_state("paused")
            trainer.emit_state("running")
        if trainer.step == 6:
            trainer.stop_requested = True


def test_control_hook_can_steer_the_run(tiny_data, tmp_path):
    control = Steering()
    cfg = tiny_config(tiny_data)
    assert train(create_run(tmp_path / "run", cfg), control=control, echo=None) == "stopped"
    run = tmp_path / "run"
    assert control.results["eval"]["step"] == 3 and control.results["eval"]["val_loss"] > 0
    assert control.results["save"].name == "step_000003"
    assert isinstance(control.results["sample"], str)
    steps = {e["step"]: e for e in events_of(run, "step")}
    assert max(steps) == 6  # stopped after step 6
    assert steps[4]["lr"] == pytest.approx(0.5 * lr_at(3, cfg))  # lr_scale applies from the next step
    assert [e["step"] for e in events_of(run, "eval")] == [3, 4]  # eval.interval changed live to 4
    assert [e["state"] for e in events_of(run, "state")] == ["starting", "running", "paused", "running", "stopped"]
    # Stopping saved a checkpoint at the stop step, with lr_scale kept for the resume.
    latest = RunDir.at(run).latest_checkpoint()
    assert latest.name == "step_000006" and checkpoint.read_state(latest)["lr_scale"] == 0.5


class Poison(Control):
    """Writes NaN into a weight once, after the checkpoint at step 10: the loss turns non-finite."""

    def __init__(self):
        self.done = False

    def poll(self, trainer):
        if trainer.step == 12 and not self.done:
            self.done = True
            with torch.no_grad():
                trainer.model.blocks[0].mlp.w_in.weight[0, 0] = float("nan")


def test_non_finite_steps_are_skipped_then_rolled_back(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data)
    assert train(create_run(tmp_path / "run", cfg), control=Poison(), echo=None) == "finished"
    messages = [e["message"] for e in events_of(tmp_path / "run", "log")]
    skipped = [m for m in messages if "optimizer step skipped" in m]
    assert len(skipped) == 3
    rollback = [m for m in messages if "rolled back" in m]
    assert rollback == ["rolled back to step_000010 after 3 non-finite steps; lr scale lowered to 0.5"]
    # After the rollback training went on from step 10 with finite losses, at half the lr.
    steps = events_of(tmp_path / "run", "step")
    assert all(math.isfinite(e["loss"]) for e in steps)
    after = [e for e in steps if e["t"] >= next(ev["t"] for ev in events_of(tmp_path / "run", "log")
                                                if "rolled back" in ev["message"])]
    assert after[0]["step"] == 11 and after[0]["lr"] == pytest.approx(0.5 * lr_at(10, cfg))
    state = checkpoint.read_state(RunDir.at(tmp_path / "run").latest_checkpoint())
    assert state["step"] == 20 and state["lr_scale"] == 0.5


class PoisonEarly(Poison):
    def poll(self, trainer):
        if trainer.step == 2:
            with torch.no_grad():
                trainer.model.wte.weight[:] = float("nan")


def test_divergence_before_any_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    from workbench.engine.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match="diverged .* before the first checkpoint; lower optim.lr"):
        train(create_run(tmp_path / "run", tiny_config(tiny_data)), control=PoisonEarly(), echo=None)
    assert events_of(tmp_path / "run", "state")[-1]["state"] == "crashed"


class Explode(Control):
    def poll(self, trainer):
        if trainer.step == 13:
            raise RuntimeError("boom in the middle of training")


def test_crash_writes_error_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        train(create_run(tmp_path / "run", tiny_config(tiny_data)), control=Explode(), echo=None)
    errors = events_of(tmp_path / "run", "error")
    assert len(errors) == 1 and "boom" in errors[0]["message"] and "Traceback" in errors[0]["traceback"]
    assert events_of(tmp_path / "run", "state")[-1]["state"] == "crashed"
    # The last checkpoint is complete: it loads, checksums verified, into a fresh model.
    loaded = checkpoint.open_run_model(tmp_path / "run")
    assert loaded.checkpoint.name == "step_000010" and loaded.state["step"] == 10



class UserErrorAt(Control):
    """Emits a system event each poll (as the engine's sampler does), then fails the way a user can."""

    def poll(self, trainer):
        trainer.events.emit("system", **fields("system"))
        if trainer.step == 3:
            from workbench.engine.errors import DataError
            raise DataError("the data went away")


def test_foreground_shows_no_system_lines_and_leaves_errors_to_the_caller(tiny_data, tmp_path):
    from workbench.engine.errors import DataError

    lines = []
    with pytest.raises(DataError, match="the data went away"):
        train(create_run(tmp_path / "run", tiny_config(tiny_data)), control=UserErrorAt(), echo=lines.append)
    # The CLI prints the error once, as one line: no echoed copy, no traceback; no system line per second.
    assert not [line for line in lines if line.startswith(("error", "system", "Traceback"))], lines
    assert lines[-1] == "state: crashed"
    errors = events_of(tmp_path / "run", "error")
    assert [e["message"] for e in errors] == ["the data went away"] and "traceback" not in errors[0]

def test_stop_at_saves_and_ends_stopped(tiny_data, tmp_path):
    assert train(create_run(tmp_path / "run", tiny_config(tiny_data)), control=StopAt(7), echo=None) == "stopped"
    assert RunDir.at(tmp_path / "run").latest_checkpoint().name == "step_000007"
    assert max(step_losses(tmp_path / "run")) == 7


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_in_the_foreground_saves_and_stops(tiny_data, tmp_path, signum):
    config = write_toml(tmp_path / "c.toml", tiny_raw(train={"max_steps": 100000}, checkpoint={"interval": 0}))
    run = tmp_path / "run"
    # A child of a background job may inherit SIGINT ignored; a terminal's foreground job would not.
    proc = workbench_popen("train", config, "--data", tiny_data, "--run", run,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not step_losses(run):
            time.sleep(0.05)
        assert step_losses(run), proc.communicate()[1] if proc.poll() is not None else "no steps yet"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert events_of(run, "state")[-1]["state"] == "stopped", (out[-2000:], err[-2000:])
    assert f"{signal.Signals(signum).name} received: stopping at step " in out
    latest = RunDir.at(run).latest_checkpoint()
    assert latest is not None and checkpoint.read_state(latest)["step"] == max(step_losses(run))


def test_quickstart_prepares_trains_and_samples(tmp_path):
    from workbench.engine.quickstart import free_run_dir

    result = workbench("quickstart", "--steps", "3", "--data", tmp_path / "data", "--run", tmp_path / "runs" / "qs",
                       timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "preparing the built-in corpus" in out and "step 3/3 | loss " in out
    assert "a sample from the trained model:" in out
    assert (tmp_path / "data" / "train.bin").is_file()
    assert RunDir.at(tmp_path / "runs" / "qs").latest_checkpoint().name == "step_000003"
    # A second quick start never overwrites the first run.
    assert free_run_dir(tmp_path / "runs" / "qs") == tmp_path / "runs" / "qs-2"


def test_example_configs_are_valid():
    from pathlib import Path

    from workbench.engine import config as config_mod

    examples = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        cfg = config_mod.load(path)
        assert cfg.train.max_steps > 0, path


def test_time_budget_ends_the_run_and_decays_the_lr_over_it(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, train={"max_steps": 1_000_000, "max_seconds": 1.5},
                      eval={"interval": 0}, checkpoint={"interval": 0})
    started = time.monotonic()
    assert train(create_run(tmp_path / "run", cfg), echo=None) == "finished"
    assert time.monotonic() - started < 30
    steps = events_of(tmp_path / "run", "step")
    last = steps[-1]
    assert 4 < last["step"] < 1_000_000 and last["elapsed_s"] >= 1.5
    # The schedule decays over the budget: the last lr is close to lr * min_lr_ratio.
    assert last["lr"] == pytest.approx(3e-3 * 0.1, rel=0.2)
    assert all(e["eta_s"] <= 1.5 for e in steps)
    # It still ends like any run: a final eval and a checkpoint.
    assert events_of(tmp_path / "run", "eval")[-1]["step"] == last["step"]
    assert RunDir.at(tmp_path / "run").latest_checkpoint().name == f"step_{last['step']:06d}"
    assert lr_at(100, cfg, elapsed_s=0.75) > lr_at(100, cfg, elapsed_s=1.4) > 0


def test_a_stop_right_after_a_periodic_checkpoint_saves_that_step_once(tiny_data, tmp_path):
    assert train(create_run(tmp_path / "run", tiny_config(tiny_data)), control=StopAt(10), echo=None) == "stopped"
    saved = [e["step"] for e in events_of(tmp_path / "run", "checkpoint")]
    assert saved == [10]
    assert RunDir.at(tmp_path / "run").latest_checkpoint().name == "step_000010"

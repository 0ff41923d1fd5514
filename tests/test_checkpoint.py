"""Checkpoints: round trips, retention (last K + best), atomic writes under kill -9, corruption and mismatch checks."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import cli_env

from workbench.engine import checkpoint
from workbench.engine.config import ModelConfig
from workbench.engine.errors import CheckpointError
from workbench.engine.model import GPT
from workbench.engine.rundir import RunDir
from workbench.kernels import select

pytestmark = pytest.mark.usefixtures("torch_single_thread")

OPS = select("torch", "cpu")


def tiny_model(d_model: int = 32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, d_model=d_model, seq_len=16, vocab_size=50), OPS)


def trained_pair(steps: int = 2) -> tuple[GPT, torch.optim.Optimizer]:
    model = tiny_model()
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    for _ in range(steps):
        model(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def state_for(step: int, val_loss: float | None = None, model: GPT | None = None) -> dict:
    cfg = {"model": vars(model.cfg) if model is not None else {}}
    return {"step": step, "tokens": step * 10, "config": cfg, "tokenizer_sha256": "a" * 64,
            "metrics": {"val_loss": val_loss}, "rng": checkpoint.capture_rng()}


def test_round_trip_model_optimizer_and_rng(tmp_path):
    run = RunDir.at(tmp_path / "run")
    model, opt = trained_pair()
    path = checkpoint.save(run, model, opt, state_for(2, 3.0, model))
    assert path == run.checkpoints / "step_000002" and run.latest_checkpoint() == path
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]

    fresh = tiny_model(seed=1)
    fresh_opt = torch.optim.AdamW(fresh.param_groups(0.1), lr=1e-2)
    state = checkpoint.load_model(path, fresh, "a" * 64)
    checkpoint.load_optimizer(path, fresh, fresh_opt, state)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key])
    # One more step from both gives the same weights: the optimizer state is complete.
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x, y).mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))

    # RNG states: restoring replays the same random numbers everywhere.
    rng = checkpoint.capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.restore_rng(rng)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_optimizer_state_is_named_by_parameter(tmp_path):
    from safetensors.torch import load_file

    model, opt = trained_pair()
    path = checkpoint.save(RunDir.at(tmp_path), model, opt, state_for(2))
    names = set(load_file(path / "optimizer.safetensors"))
    assert "blocks.0.attn.qkv.weight.exp_avg" in names and "wte.weight.step" in names
    assert len(names) == 3 * len(list(model.parameters()))


def test_keeps_last_k_plus_best(tmp_path):
    run = RunDir.at(tmp_path / "run")
    model, opt = trained_pair(1)
    losses = {1: 5.0, 2: 3.0, 3: 4.0, 4: 6.0, 5: 7.0, 6: None}
    for step, loss in losses.items():
        checkpoint.save(run, model, opt, state_for(step, loss), keep_last=2, keep_best=True)
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_000002", "step_000005", "step_000006"]
    assert run.latest_checkpoint().name == "step_000006"
    checkpoint.save(run, model, opt, state_for(7, 2.5), keep_last=2, keep_best=True)
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_000006", "step_000007"]
    checkpoint.save(run, model, opt, state_for(8, 9.0), keep_last=1, keep_best=False)
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_000008"]
    assert not [p for p in run.checkpoints.iterdir() if p.name.startswith(".")]



def test_missing_or_dangling_latest_falls_back_to_the_highest_complete_step(tmp_path):
    run = RunDir.at(tmp_path / "run")
    assert run.latest_checkpoint() is None
    model, opt = trained_pair(1)
    for step in (9, 10, 11):
        checkpoint.save(run, model, opt, state_for(step), keep_last=3)
    (run.checkpoints / "step_000011" / "state.json").unlink()  # incomplete: not a fallback
    for pointer in ("step_000099", "", None):  # deleted by hand, empty, missing
        if pointer is None:
            run.latest_pointer.unlink()
        else:
            run.latest_pointer.write_text(pointer + "\n")
        assert run.latest_checkpoint() == run.checkpoints / "step_000010", pointer
    # A pointer to an existing, older checkpoint (the TUI's "resume from here") is still obeyed.
    run.latest_pointer.write_text("step_000009\n")
    assert run.latest_checkpoint().name == "step_000009"


def test_a_damaged_old_checkpoint_does_not_fail_the_next_save(tmp_path):
    run = RunDir.at(tmp_path / "run")
    model, opt = trained_pair(1)
    checkpoint.save(run, model, opt, state_for(1, 5.0), keep_last=2)
    (run.checkpoints / "step_000001" / "state.json").write_text("{not json")
    checkpoint.save(run, model, opt, state_for(2, 4.0), keep_last=2)
    checkpoint.save(run, model, opt, state_for(3, 3.0), keep_last=2)
    assert run.latest_checkpoint().name == "step_000003"
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_000002", "step_000003"]

def test_failed_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    run = RunDir.at(tmp_path / "run")
    model, opt = trained_pair(1)
    checkpoint.save(run, model, opt, state_for(1))
    real_write = checkpoint._write_synced

    def write_then_fail(path, data):
        if path.name == "state.json":
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write_synced", write_then_fail)
    with pytest.raises(OSError):
        checkpoint.save(run, model, opt, state_for(2))
    assert [p.name for p in run.checkpoints.iterdir()] == ["latest", "step_000001"]
    assert run.latest_checkpoint().name == "step_000001"


def test_kill_9_during_saves_never_leaves_a_visible_partial_checkpoint(tmp_path):
    """A process saving ~1 MB checkpoints in a loop is killed at a random moment, several times:
    every checkpoint visible afterwards loads with its checksums intact, and `latest` is one of them."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import trained_pair, state_for
        from workbench.engine import checkpoint
        from workbench.engine.rundir import RunDir
        model, opt = trained_pair(1)
        model.wte.weight.data = torch.randn(4000, 32)  # a bigger file: a wider window to be killed in
        run = RunDir.at({str(tmp_path / 'run')!r})
        step = int(sys.argv[1])
        print("ready", flush=True)
        while True:
            step += 1
            checkpoint.save(run, model, opt, state_for(step), keep_last=3)
    """)
    run = RunDir.at(tmp_path / "run")
    rng = random.Random(0)
    start = 0
    for _attempt in range(2):
        proc = subprocess.Popen([sys.executable, "-c", script, str(start)], env=cli_env(), stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + rng.random() * 0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        visible = checkpoint.list_checkpoints(run)
        assert visible, "no checkpoint was written before the kill"
        for ckpt in visible:
            state = checkpoint.read_state(ckpt)
            for name in ("model.safetensors", "optimizer.safetensors"):
                checkpoint._read_tensors(ckpt, name, state)  # checksum + parse: complete
        assert run.latest_checkpoint() in visible
        checkpoint.clean_temporaries(run)
        assert all(not p.name.startswith(".") or p.name.startswith(".latest") for p in run.checkpoints.iterdir())
        start = int(checkpoint.read_state(visible[-1])["step"])


def test_truncated_or_corrupt_files_raise_checkpoint_error(tmp_path):
    model, opt = trained_pair(1)
    path = checkpoint.save(RunDir.at(tmp_path), model, opt, state_for(1))
    data = (path / "model.safetensors").read_bytes()

    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        checkpoint.load_model(path, tiny_model())

    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load_model(path, tiny_model())

    # Without the recorded checksums (an older or hand-made checkpoint), safetensors' own checks still catch truncation.
    state = checkpoint.read_state(path)
    state.pop("files")
    (path / "state.json").write_text(__import__("json").dumps(state))
    (path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load_model(path, tiny_model())

    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt state.json"):
        checkpoint.load_model(path, tiny_model())


def test_shape_and_tokenizer_mismatch_are_one_clear_line(tmp_path):
    model, opt = trained_pair(1)
    path = checkpoint.save(RunDir.at(tmp_path), model, opt, state_for(1, model=model))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_model(path, tiny_model(d_model=64))
    message = str(err.value)
    assert "\n" not in message and "does not fit this model" in message
    assert "wte.weight is 50x32 in the checkpoint but 50x64 in the model" in message and "d_model=32" in message
    with pytest.raises(CheckpointError, match="different tokenizer"):
        checkpoint.load_model(path, tiny_model(), tokenizer_sha256="b" * 64)


def test_resolve_names_runs_and_checkpoints(tmp_path):
    run = RunDir.at(tmp_path / "run")
    with pytest.raises(CheckpointError, match="no run or checkpoint"):
        checkpoint.resolve(tmp_path / "nowhere")
    model, opt = trained_pair(1)
    for step in (1, 2):
        checkpoint.save(run, model, opt, state_for(step))
    assert checkpoint.resolve(run.root) == run.checkpoints / "step_000002"
    assert checkpoint.resolve(run.root, "step_000001") == run.checkpoints / "step_000001"
    assert checkpoint.resolve(run.checkpoints / "step_000001") == run.checkpoints / "step_000001"
    with pytest.raises(CheckpointError, match="available: step_000001, step_000002"):
        checkpoint.resolve(run.root, "step_000009")


def test_nothing_is_ever_unpickled():
    engine = Path(__file__).resolve().parent.parent / "engine"
    for source in engine.rglob("*.py"):
        text = source.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, source


def test_latest_is_a_checkpoint_name_and_run_files_are_ordinary_files(tmp_path):
    from workbench.engine.rundir import atomic_write_text

    run = RunDir.at(tmp_path / "run")
    (run.checkpoints / "step_000003").mkdir(parents=True)
    (run.checkpoints / "step_000003" / "state.json").write_text('{"step": 3}')
    atomic_write_text(run.latest_pointer, "step_000003\n")
    assert checkpoint.resolve(run.root, "latest") == run.checkpoints / "step_000003"
    mode = run.latest_pointer.stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask

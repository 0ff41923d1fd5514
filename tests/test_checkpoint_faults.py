"""Checkpoint saves that fail for real: the engine's own command line under a file-size limit.

RLIMIT_FSIZE (with SIGXFSZ ignored) makes every write past LIMIT bytes fail with EFBIG,
as a full disk fails writes with ENOSPC: events.jsonl and the run files stay under it, a
checkpoint's model.safetensors (~1 MB for this model) does not. A failed save must leave
no partial files, keep training, retry at the next interval and give up only after
MAX_SAVE_FAILURES in a row; whatever was saved before stays as it was.
"""

from __future__ import annotations

import hashlib
import re
import resource
import subprocess
from pathlib import Path

import pytest
from engine_helpers import engine_popen, events_of, file_size_limit, tiny_raw, wait_for, write_toml

from workbench.engine import checkpoint
from workbench.engine.process import client
from workbench.engine.rundir import RunDir

LIMIT = 512 * 1024
# One layer, 128 wide: model.safetensors is ~1 MB, well over LIMIT; a step still takes milliseconds.
WIDE = ("--set", "model.n_layer=1", "--set", "model.d_model=128")
EFBIG = "File too large (errno 27: over the process's file size limit or the filesystem's largest file)"
NONE_YET = "no checkpoint of this run is saved yet"


@pytest.fixture
def config(tmp_path) -> Path:
    return write_toml(tmp_path / "tiny.toml", tiny_raw(train={"log_interval": 5}, eval={"interval": 0}))


def engine(*args, limit: int | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m workbench.engine ...` to its end, writes past `limit` bytes failing."""
    proc = engine_popen(*args, preexec_fn=file_size_limit(limit) if limit else None)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.wait(), out, err)


def failures(run: Path) -> list[str]:
    return [e["message"] for e in events_of(run, "log") if " not saved: " in e["message"]]


def checkpoint_files(run: Path) -> dict[str, str]:
    folder = run / "checkpoints"
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_no_partial_checkpoints(run: Path) -> None:
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert leftovers == []
    assert (run / "events.jsonl").stat().st_size < LIMIT  # only the checkpoints were over the limit


def test_every_save_failing_keeps_training_then_gives_up_after_three(tiny_data, tmp_path, config):
    run = tmp_path / "run"
    result = engine("train", config, "--data", tiny_data, "--run", run, "--max-steps", "100", *WIDE, limit=LIMIT)
    give_up = f"checkpoint step_000030 not saved: {EFBIG}; {NONE_YET}; giving up after 3 failed saves in a row"
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: {give_up}\n"
    assert "Traceback" not in result.stdout + result.stderr
    logged = [f"checkpoint step_000010 not saved: {EFBIG}; {NONE_YET}; retrying at step 20 (failure 1 of 3)",
              f"checkpoint step_000020 not saved: {EFBIG}; {NONE_YET}; retrying at step 30 (failure 2 of 3)"]
    assert failures(run) == logged
    assert [line for line in result.stdout.splitlines() if " not saved: " in line] == logged  # the foreground too
    errors = events_of(run, "error")
    assert [e["message"] for e in errors] == [give_up] and "traceback" not in errors[0]
    assert events_of(run, "state")[-1]["state"] == "crashed"
    # It trained past the first failure, up to the third.
    assert max(e["step"] for e in events_of(run, "step")) == 30
    assert not events_of(run, "checkpoint") and RunDir.at(run).latest_checkpoint() is None
    assert list((run / "checkpoints").iterdir()) == []
    assert_no_partial_checkpoints(run)


def test_a_resumed_run_that_cannot_save_leaves_its_earlier_checkpoints_intact(tiny_data, tmp_path, config):
    run = tmp_path / "run"
    first = engine("train", config, "--data", tiny_data, "--run", run, "--max-steps", "20", *WIDE)
    assert first.returncode == 0, first.stderr
    saved = checkpoint_files(run)
    assert set(saved) >= {"latest", "step_000010/model.safetensors", "step_000020/model.safetensors"}
    assert (run / "checkpoints" / "step_000020" / "model.safetensors").stat().st_size > LIMIT

    result = engine("train", "--resume", run, "--max-steps", "50", limit=LIMIT)
    final = (f"checkpoint step_000050 not saved: {EFBIG}; step_000020 is intact; "
             "the run ends without its final checkpoint")
    assert result.returncode == 2 and result.stderr == f"error: {final}\n", result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert failures(run) == [
        f"checkpoint step_000030 not saved: {EFBIG}; step_000020 is intact; retrying at step 40 (failure 1 of 3)",
        f"checkpoint step_000040 not saved: {EFBIG}; step_000020 is intact; retrying with the final checkpoint "
        "(failure 2 of 3)"]
    assert [e["message"] for e in events_of(run, "error")] == [final]
    assert max(e["step"] for e in events_of(run, "step")) == 50 and events_of(run, "state")[-1]["state"] == "crashed"
    # Nothing saved before was touched: the same files, `latest` still naming step_000020, which loads.
    assert checkpoint_files(run) == saved
    assert_no_partial_checkpoints(run)
    assert checkpoint.resolve(run).name == "step_000020"
    assert checkpoint.open_run_model(run).state["step"] == 20


def test_a_successful_save_resets_the_count_and_socket_saves_answer_the_reason(tiny_data, tmp_path, config):
    """The limit is lowered and lifted in the running engine (resource.prlimit), as a disk fills up and is
    freed; the saves are `save` requests over the control socket, so each lands where the test wants."""
    run = tmp_path / "run"
    proc = engine_popen("train", config, "--data", tiny_data, "--run", run, "--max-steps", "10000000",
                        "--set", "checkpoint.interval=0", *WIDE, preexec_fn=file_size_limit(LIMIT))
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]

    def limit(soft: int) -> None:
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (soft, hard))

    def status():
        try:
            return client.request(run, "status", timeout=10)
        except (client.EngineError, client.EngineNotRunning):  # not serving yet
            return None

    def save() -> dict:
        return client.request(run, "save", check=False)

    def failed(reply: dict, kept: str, count: int) -> None:
        assert reply["ok"] is False
        assert re.fullmatch(rf"checkpoint step_\d{{6}} not saved: {re.escape(EFBIG)}; {kept}; "
                            rf"retrying with the final checkpoint \(failure {count} of 3\)", reply["error"])

    try:
        wait_for(lambda: (status() or {}).get("state") == "running", 120, 0.2, what="the engine to train")
        failed(save(), NONE_YET, 1)
        assert_no_partial_checkpoints(run)
        limit(resource.RLIM_INFINITY)  # space freed
        ok = save()
        assert ok["ok"], ok
        good = Path(ok["checkpoint"]).name
        wait_for(lambda: status()["step"] > ok["step"], what="a step after the save")
        limit(LIMIT)  # the disk fills again: the count starts over
        failed(save(), f"{good} is intact", 1)
        failed(save(), f"{good} is intact", 2)
        assert status()["state"] == "running"  # two in a row: training goes on
        limit(resource.RLIM_INFINITY)
        stopped = client.request(run, "stop")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0 and "Traceback" not in out + err, err
    assert len(failures(run)) == 3 and not events_of(run, "error")
    latest = RunDir.at(run).latest_checkpoint()
    assert latest.name == f"step_{stopped['step']:06d}" and (run / "checkpoints" / good / "state.json").is_file()
    assert events_of(run, "state")[-1]["state"] == "stopped"
    assert_no_partial_checkpoints(run)


def test_a_file_too_large_outside_a_checkpoint_is_one_line(tiny_data, tmp_path, config):
    """Below the size of the run's own files (the tokenizer copy): the CLI's handler, not a traceback."""
    result = engine("train", config, "--data", tiny_data, "--run", tmp_path / "run", limit=1000)
    assert result.returncode == 1
    assert result.stderr == ("error: file too large while writing output (over the file size limit, see "
                             "`ulimit -f`); nothing saved earlier was touched\n")

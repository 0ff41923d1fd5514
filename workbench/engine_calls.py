"""Every way the TUI starts engine work.

Heavy work (preparation, training, sampling) runs in child processes of
`python -m workbench.engine ...`, so the TUI process never imports torch; a running engine
is talked to through `workbench.engine.process.client`. Each function here blocks: call it from a
thread worker, never from the UI thread. Failures raise `EngineCallError` with
the engine's own one-line message (`error: ...`), ready for a notification.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from workbench.engine.errors import WorkbenchError
from workbench.engine.process.spawn import child_env
from workbench.engine.rundir import RunDir, atomic_write_text

# A detached start returns once the engine is up; a cold torch import on a busy
# 2-core machine can take a while, so this is generous.
START_TIMEOUT_S = 180.0


class EngineCallError(Exception):
    """An engine command failed; the message is one line meant for the user."""


def engine_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench.engine", *args]


def error_line(stderr: str, returncode: int) -> str:
    """The engine's `error: ...` line, else the last line it printed, else the exit status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else f"engine exited with status {returncode}"


def run_engine(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run one engine command to completion; raise EngineCallError on a non-zero exit.

    Output goes to temporary files, not pipes: a detached engine that kept an
    inherited pipe open would otherwise make us wait for it to end.
    """
    with tempfile.TemporaryFile("w+t") as out, tempfile.TemporaryFile("w+t") as err:
        try:
            rc = subprocess.run(engine_command(*args), stdout=out, stderr=err, text=True, env=child_env(),
                                stdin=subprocess.DEVNULL, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise EngineCallError(f"`workbench {args[0]}` did not finish within {timeout:.0f} s") from None
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(args, rc, out.read(), err.read())
    if done.returncode != 0:
        raise EngineCallError(error_line(done.stderr, done.returncode))
    return done


# ---------------------------------------------------------------- preparation

def prepare_args(out: str | Path, sources: Iterable[str] = (), vocab_size: int | None = None,
                 extra: Iterable[str] = ()) -> list[str]:
    args = ["prepare", "--out", str(out)]
    for source in sources:
        args += ["--source", str(source)]
    if vocab_size:
        args += ["--vocab-size", str(vocab_size)]
    return [*args, *extra, "--progress-json"]


class PrepareJob:
    """`workbench prepare ... --progress-json`, streaming one progress dict per line to a callback."""

    def __init__(self, args: list[str]):
        self.args = args
        self._proc: subprocess.Popen | None = None
        self._cancelled = threading.Event()

    def run(self, on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Run to the end; return the report (report.json). Raises EngineCallError."""
        err = tempfile.TemporaryFile(mode="w+t")
        self._proc = subprocess.Popen(engine_command(*self.args), stdout=subprocess.PIPE, stderr=err,
                                      stdin=subprocess.DEVNULL, text=True, env=child_env(), bufsize=1)
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                update = json.loads(line)
            except ValueError:
                continue
            if isinstance(update, dict):
                on_progress(update)
        rc = self._proc.wait()
        err.seek(0)
        stderr = err.read()
        err.close()
        if self._cancelled.is_set():
            raise EngineCallError("preparation cancelled")
        if rc != 0:
            raise EngineCallError(error_line(stderr, rc))
        return read_report(self.out)

    @property
    def out(self) -> Path:
        return Path(self.args[self.args.index("--out") + 1])

    def cancel(self) -> None:
        self._cancelled.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()


def read_report(data_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(data_dir) / "report.json").read_text())
    except (OSError, ValueError):
        return {}


PREPARED_FILES = ("report.json", "tokenizer.model", "train.bin", "val.bin")


def is_prepared(data_dir: str | Path) -> bool:
    """A finished `workbench prepare` output (the report is written last)."""
    d = Path(data_dir)
    return all((d / name).is_file() for name in PREPARED_FILES)


def prepared_datasets(data_root: str | Path) -> list[Path]:
    """Prepared dataset folders under data_root (newest first)."""
    root = Path(data_root)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and is_prepared(d)]
    return sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)


# ---------------------------------------------------------------- training

def start_training(run: str | Path, data: str | Path, config_toml: str | None = None, *,
                   init_from: str | Path | None = None, overrides: Iterable[str] = ()) -> str:
    """Start a new run in a detached engine; return what `workbench train` printed.

    Without `config_toml` the run takes the settings of the `init_from` checkpoint
    (fine-tuning: same shape, new data, `overrides` such as a lower optim.lr).
    """
    run = Path(run)
    run.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        args = ["train"]
        if config_toml is not None:
            # The engine copies the config into the run; this file only carries it there.
            fd, tmp = tempfile.mkstemp(prefix=f".{run.name}.", suffix=".toml", dir=run.parent)
            with os.fdopen(fd, "w") as f:
                f.write(config_toml)
            args.append(tmp)
        args += ["--data", str(data), "--run", str(run), "--detach"]
        if init_from:
            args += ["--init-from", str(init_from)]
        for item in overrides:
            args += ["--set", item]
        return run_engine(*args, timeout=START_TIMEOUT_S).stdout
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def resume_training(run: str | Path, checkpoint: str | None = None, max_steps: int | None = None) -> str:
    """Continue a stopped, finished or crashed run in a detached engine.

    With `checkpoint`, the run's `latest` pointer is first moved to that
    checkpoint, so training continues from there; `max_steps` extends the run.
    """
    if checkpoint:
        point_latest_at(run, checkpoint)
    args = ["train", "--resume", str(run), "--detach"]
    if max_steps:
        args += ["--max-steps", str(max_steps)]
    return run_engine(*args, timeout=START_TIMEOUT_S).stdout


class Sampler:
    """Generations from a checkpoint in `workbench sample --json` children (torch stays out of the TUI).

    The children are tracked so that close() (leaving a screen, or the app) ends those still
    running at once instead of waiting for generations nobody will read.
    """

    def __init__(self) -> None:
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._closed = False

    def __call__(self, run: str | Path, prompt: str, checkpoint: str | None = None, *, n: int = 1,
                 max_tokens: int = 64, temperature: float = 0.8, top_p: float | None = None,
                 seed: int | None = None) -> list[dict[str, Any]]:
        args = ["sample", str(run), f"--prompt={prompt}", "--json", "-n", str(n),
                "--max-tokens", str(max_tokens), "--temperature", str(temperature)]
        if checkpoint:
            args += ["--checkpoint", checkpoint]
        if top_p is not None:
            args += ["--top-p", str(top_p)]
        if seed is not None:
            args += ["--seed", str(seed)]
        with self._lock:
            if self._closed:
                raise EngineCallError("cancelled")
            child = subprocess.Popen(engine_command(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=child_env())
            self._children.add(child)
        try:
            out, err = child.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            child.kill()
            raise EngineCallError("`workbench sample` did not finish within 600 s") from None
        finally:
            with self._lock:
                self._children.discard(child)
        if self._closed:
            raise EngineCallError("cancelled")
        if child.returncode != 0:
            raise EngineCallError(error_line(err, child.returncode))
        samples = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("{") or line.startswith("["):
                value = json.loads(line)
                samples.extend(value if isinstance(value, list) else [value])
        if not samples:
            raise EngineCallError("the sampler printed no result")
        return samples

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for child in self._children:
                child.terminate()


def sample(run: str | Path, prompt: str, checkpoint: str | None = None, **settings: Any) -> list[dict[str, Any]]:
    """Generate from a checkpoint in a child process (`workbench sample --json`); see Sampler."""
    return Sampler()(run, prompt, checkpoint, **settings)


# ---------------------------------------------------------------- control and files

def control(run: str | Path, op: str, **args: Any) -> dict[str, Any]:
    """One request to the run's engine over its control socket."""
    from workbench.engine.process import client

    try:
        return client.request(Path(run), op, **args)
    except (WorkbenchError, OSError, ValueError) as e:  # the client's errors are one line already
        raise EngineCallError(str(e) or type(e).__name__) from None


def engine_alive(run: str | Path) -> bool:
    from workbench.engine.process import client

    return client.engine_alive(Path(run))


def delete_run(run: str | Path) -> None:
    """Remove a run directory; refused while its engine runs."""
    run = Path(run)
    if engine_alive(run):
        raise EngineCallError(f"{run.name} is still running; stop it first")
    if not RunDir.at(run).exists() and not RunDir.at(run).events.exists():
        raise EngineCallError(f"{run} is not a run directory")
    shutil.rmtree(run)


def checkpoint_names(run: str | Path) -> list[str]:
    """Complete checkpoints, oldest first."""
    from workbench.engine.checkpoint import list_checkpoints

    return [p.name for p in list_checkpoints(RunDir.at(run))]


def point_latest_at(run: str | Path, checkpoint: str) -> None:
    rd = RunDir.at(run)
    if not (rd.checkpoints / checkpoint / "state.json").is_file():
        raise EngineCallError(f"no checkpoint {checkpoint} in {rd.name}")
    if engine_alive(run):
        raise EngineCallError(f"{rd.name} is running; stop it before resuming from another checkpoint")
    atomic_write_text(rd.latest_pointer, checkpoint + "\n")


def delete_checkpoint(run: str | Path, checkpoint: str) -> None:
    """Remove one checkpoint; `latest` moves to the newest one left (written atomically)."""
    rd = RunDir.at(run)
    target = rd.checkpoints / checkpoint
    if not target.is_dir() or target.parent != rd.checkpoints:
        raise EngineCallError(f"no checkpoint {checkpoint} in {rd.name}")
    if engine_alive(run):
        raise EngineCallError(f"{rd.name} is running; stop it before deleting checkpoints")
    latest = rd.latest_checkpoint()
    if latest is not None and latest.name == checkpoint:
        rest = [name for name in checkpoint_names(run) if name != checkpoint]
        if rest:
            atomic_write_text(rd.latest_pointer, rest[-1] + "\n")
        else:
            rd.latest_pointer.unlink(missing_ok=True)
    shutil.rmtree(target)


# ---------------------------------------------------------------- chat

def start_chat_service(run: str | Path, timeout: float = START_TIMEOUT_S) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start `workbench serve RUN` as a child; return it and its `service_info` once serve.sock answers.

    Raises EngineCallError with the service's own error line if it exits first or does not answer in
    time (the child is then stopped). Stop it with `stop_chat_service`."""
    import time

    from workbench.engine.serve import ServiceNotRunning, service_info

    err = tempfile.TemporaryFile("w+t")
    child = subprocess.Popen(engine_command("serve", str(run)), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=err, text=True, env=child_env())
    child.stderr_file = err  # type: ignore[attr-defined]  # read for the base-model warning / errors
    deadline = time.monotonic() + timeout
    while True:
        rc = child.poll()
        if rc is not None:
            err.seek(0)
            message = error_line(err.read(), rc)
            err.close()
            raise EngineCallError(f"`workbench serve` failed: {message}")
        try:
            return child, service_info(run)
        except (ServiceNotRunning, WorkbenchError, OSError, ValueError, StopIteration):
            pass
        if time.monotonic() > deadline:
            stop_chat_service(child)
            raise EngineCallError(f"`workbench serve` did not answer on serve.sock within {timeout:.0f} s")
        time.sleep(0.2)


def stop_chat_service(child: subprocess.Popen | None) -> None:
    """End a service started by start_chat_service (SIGTERM, then SIGKILL after 5 s)."""
    if child is None:
        return
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    err = getattr(child, "stderr_file", None)
    if err is not None:
        err.close()

"""The run directory: the single source of truth for one run (see ../shared/DESIGN.md).

    runs/<name>/config.toml  events.jsonl  checkpoints/step_NNNNNN/ checkpoints/latest
                 ratings.jsonl  engine.sock  engine.pid  engine.lock  engine.log
This module only names paths and does atomic small-file writes; it imports no torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; these are ordinary files
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def at(cls, path: str | Path) -> RunDir:
        return cls(Path(path))

    @property
    def name(self) -> str:
        return self.root.name

    config = property(lambda self: self.root / "config.toml")
    events = property(lambda self: self.root / "events.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    latest_pointer = property(lambda self: self.root / "checkpoints" / "latest")
    ratings = property(lambda self: self.root / "ratings.jsonl")
    socket = property(lambda self: self.root / "engine.sock")
    pid = property(lambda self: self.root / "engine.pid")
    lock = property(lambda self: self.root / "engine.lock")
    log = property(lambda self: self.root / "engine.log")

    def exists(self) -> bool:
        return self.config.is_file()

    def write_run_files(self, cfg, tokenizer) -> None:
        """config.toml (the resolved config) and a copy of the tokenizer, so the run can be
        sampled even after its data moved. config.toml is written last: it marks a run as existing."""
        from workbench.engine.config import to_toml

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / "tokenizer.model", tokenizer.model_bytes)
        atomic_write_text(self.root / "tokenizer.json", json.dumps(tokenizer.meta(), indent=2) + "\n")
        atomic_write_text(self.config, to_toml(cfg))

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint folder the `latest` pointer names; if the pointer is missing or names no
        folder (deleted by hand, or a crash right after the first save), the highest complete step:
        a resume must never restart from step 0 while checkpoints exist."""
        try:
            name = self.latest_pointer.read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            name = ""
        if name and (self.checkpoints / name).is_dir():
            return self.checkpoints / name
        from workbench.engine.checkpoint import list_checkpoints  # torch-free; imported here: it imports us

        complete = list_checkpoints(self)
        return complete[-1] if complete else None

"""Messages that workers and screens post to each other.

Workers run engine calls off the UI thread and report back with these; the UI
thread only renders what they carry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.message import Message


class RunsChanged(Message):
    """A run was created, started, stopped or deleted: lists should refresh now."""

    def __init__(self, run_dir: Path | None = None) -> None:
        super().__init__()
        self.run_dir = run_dir


class PrepareProgress(Message):
    """One progress update from `workbench prepare --progress-json`."""

    def __init__(self, update: dict[str, Any]) -> None:
        super().__init__()
        self.update = update


class PrepareFinished(Message):
    """Preparation ended: `report` on success, else `error` holds one line."""

    def __init__(self, data_dir: Path, report: dict[str, Any] | None, error: str | None = None) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.report = report
        self.error = error

"""Data preparation throughput and memory: `python bench/prepare_speed.py --data input.txt [--mb 100]`.

Builds a corpus of `--mb` megabytes from one text by repeating it with variations, so that
dedup has real work without dropping everything:
- half of the bytes are big .txt files ("books"): excerpts with 20% of their words swapped
  for others of the same text, so every excerpt is new;
- the other half are small files ("notes"), one document each: 80% new variations,
  10% exact copies of an earlier note, 10% near copies (1% of the words changed).
Then runs `python -m workbench.engine prepare` on it in a child process, at a quarter of the size and
at the full size, and prints MB/s and the child's peak RSS for each: the peak must not grow
with the corpus (streaming). `measure(text_path, mb)` does one size and returns the numbers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NOTE_CHARS = (2000, 7000)
BOOK_MB = 4


class Variations:
    def __init__(self, text: str, seed: int):
        self.rng = np.random.default_rng(seed)
        self.lines = text.splitlines(keepends=True)
        self.vocab = np.array(sorted(set(re.findall(r"[A-Za-z']+", text))))

    def excerpt(self, chars: int) -> str:
        start = int(self.rng.integers(0, max(1, len(self.lines) - 1)))
        out, size, i = [], 0, start
        while size < chars:
            line = self.lines[i % len(self.lines)]
            out.append(line)
            size += len(line)
            i += 1
        return "".join(out).strip("\n") + "\n"

    def mutate(self, text: str, rate: float) -> str:
        parts = re.split(r"(\s+)", text)  # words at even positions, whitespace between
        words = np.arange(0, len(parts), 2)
        chosen = words[self.rng.random(len(words)) < rate]
        for i, w in zip(chosen, self.rng.choice(self.vocab, size=len(chosen)), strict=True):
            parts[i] = str(w)
        return "".join(parts)


def build_corpus(text_path: str | Path, mb: float, folder: Path, seed: int = 0) -> int:
    """Write about `mb` MB under `folder`; returns the bytes written."""
    var = Variations(Path(text_path).read_text(encoding="utf-8"), seed)
    target = int(mb * 1e6)
    (folder / "books").mkdir(parents=True)
    written = 0
    book = 0
    while written < target // 2:  # books: big files of fresh variations, cut into documents by prepare
        chunks, size = [], 0
        while size < BOOK_MB * 1e6 and written + size < target // 2:
            chunk = var.mutate(var.excerpt(int(var.rng.integers(*NOTE_CHARS))), 0.2)
            chunks.append(chunk)
            size += len(chunk) + 1
        data = "\n".join(chunks).encode("utf-8")
        (folder / "books" / f"book{book:03d}.txt").write_bytes(data)
        written += len(data)
        book += 1
    notes: list[str] = []
    while written < target:
        roll = var.rng.random()
        if notes and roll < 0.1:
            note = notes[int(var.rng.integers(len(notes)))]
        elif notes and roll < 0.2:
            note = var.mutate(notes[int(var.rng.integers(len(notes)))], 0.01)
        else:
            note = var.mutate(var.excerpt(int(var.rng.integers(*NOTE_CHARS))), 0.2)
        if len(notes) < 2000:  # keep a bounded pool of earlier notes to copy from
            notes.append(note)
        else:
            notes[int(var.rng.integers(len(notes)))] = note
        index = written  # unique and increasing: a file name; folders of ~10 MB each
        sub = folder / "notes" / f"{index // 10_000_000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        data = note.encode("utf-8")
        (sub / f"note{index:012d}.txt").write_bytes(data)
        written += len(data)
    return written


def run_prepare(corpus: Path, out: Path, extra: list[str] | None = None) -> dict:
    """Run `python -m workbench.engine prepare` in a child; returns seconds and the child's own peak RSS."""
    cmd = [sys.executable, "-m", "workbench.engine", "prepare", "--source", str(corpus), "--out", str(out), "--quiet",
           *(extra or [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)  # this child's rusage alone, not all children's
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = child.stdout.read().decode(), child.stderr.read().decode()
    if child.returncode != 0:
        raise RuntimeError(f"prepare failed ({child.returncode}): {stderr.strip()[-2000:]}")
    # the child's CPU time includes its worker processes: a load-independent measure on a shared machine
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "report": stdout}


def measure(text_path: str | Path, mb: float = 100, extra: list[str] | None = None, keep: Path | None = None) -> dict:
    """Build an `mb` MB corpus from `text_path`, prepare it, return {mb, seconds, mb_per_s, peak_rss_mb}
    (plus cpu_seconds, load: the 1-minute load average before the run, and report: prepare's report)."""
    with tempfile.TemporaryDirectory(prefix="wb-prepare-bench-") as tmp:
        corpus = Path(tmp) / "corpus"
        size = build_corpus(text_path, mb, corpus)
        load = os.getloadavg()[0]
        result = run_prepare(corpus, Path(keep) if keep else Path(tmp) / "out", extra)
    real_mb = size / 1e6
    return {"mb": round(real_mb, 1), "seconds": round(result["seconds"], 2),
            "mb_per_s": round(real_mb / result["seconds"], 2), "peak_rss_mb": round(result["peak_rss_mb"], 1),
            "cpu_seconds": round(result["cpu_seconds"], 1), "load": round(load, 2), "report": result["report"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a UTF-8 text file to build the corpus from")
    parser.add_argument("--mb", type=float, default=100, help="the larger corpus size (the smaller is a quarter)")
    parser.add_argument("--show-report", action="store_true", help="print prepare's report for the larger size")
    args = parser.parse_args()
    rows = []
    for mb in (args.mb / 4, args.mb):
        r = measure(args.data, mb)
        rows.append(r)
        print(f"prepare {r['mb']:7.1f} MB: {r['seconds']:7.1f} s  {r['mb_per_s']:6.2f} MB/s  "
              f"peak RSS {r['peak_rss_mb']:7.1f} MB  (CPU {r['cpu_seconds']:.1f} s, "
              f"{r['mb'] / r['cpu_seconds']:.2f} MB per CPU-second; load before {r['load']:.1f})", flush=True)
    if args.show_report:
        print(rows[-1]["report"])
    growth = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS grew {growth:.2f}x for a {rows[1]['mb'] / rows[0]['mb']:.1f}x larger corpus")
    return 0


if __name__ == "__main__":
    sys.exit(main())

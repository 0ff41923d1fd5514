"""What watching a run costs it: training tokens/s of a detached engine with nobody watching,
against the same engine with two live `workbench attach` readers and system stats every second.

    python bench/engine_overhead.py [--data DATASET] [--seconds 15] [--rounds 3] [--threads 1] [--apart]

Two fresh engines train the same config on the same data:
  quiet:   no reader, system stats off
  watched: two `workbench attach` processes following it live, system stats every 1 s
Tokens/s is wall-clock over a steady window, from the step events' own times and
token counts, so polling the control queue, writing events and the stats thread
are all inside it.

By default the two engines run side by side (one CPU thread each) and are measured
over the same seconds: on a shared machine a neighbour's load then hits both alike,
where one after the other it would swamp the difference. `--apart` runs them one
after the other instead (rounds alternate who goes first). Each round gives an
overhead; the median is reported, with the engines' CPU seconds per 1k tokens
(which load disturbs far less) and the readers' own CPU use. Without --data it
prepares ~1 MB of the built-in corpus in a temp folder.
The last line is `quiet=X watched=Y overhead=Z%`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from workbench.engine import config as config_mod
from workbench.engine.events import read_events
from workbench.engine.process import client
from workbench.engine.process.spawn import spawn_detached
from workbench.engine.run_setup import create_run


def prepare_data(folder: Path, max_chars: int = 1_000_000) -> Path:
    from workbench.engine.data.builtin import builtin_documents
    from workbench.engine.data.prepare import prepare

    corpus = folder / "corpus.jsonl"
    total = 0
    with open(corpus, "w", encoding="utf-8") as f:
        for _, text in builtin_documents(2000):
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total >= max_chars:
                break
    out = folder / "dataset"
    prepare([corpus], out, {"vocab_size": 1024, "val_fraction": 0.05})
    return out


def bench_config(data: Path, threads: int) -> config_mod.RunConfig:
    return config_mod.from_dict({
        "data": {"path": str(data)},
        # small enough for tens of steps a second on a CPU core, so the per-step costs of
        # watching (polling the control queue, writing events) weigh as much as they ever will
        "model": {"n_layer": 2, "n_head": 4, "d_model": 64, "seq_len": 64},
        "optim": {"lr": 1e-3, "warmup_steps": 10},
        "train": {"batch_size": 8, "max_steps": 10_000_000, "device": "auto", "threads": threads, "seed": 1},
        "eval": {"interval": 0, "sample_interval": 0},
        "checkpoint": {"interval": 0, "keep_last": 1},
    })


def last_step(run: Path) -> dict | None:
    steps = [e for e in read_events(run / "events.jsonl")[0] if e["type"] == "step"]
    return steps[-1] if steps else None


@dataclass
class Engine:
    run: Path
    watched: bool
    pid: int = 0
    readers: list = field(default_factory=list)

    def start(self, data: Path, threads: int) -> Engine:
        run = create_run(self.run, bench_config(data, threads))
        self.pid = spawn_detached(run, stats_interval=1.0 if self.watched else 0)
        if self.watched:
            env = dict(os.environ, PYTHONPATH=str(REPO))
            self.readers = [subprocess.Popen([sys.executable, "-m", "workbench.cli", "attach", str(self.run),
                                              "--system"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             env=env) for _ in range(2)]
        return self

    def mark(self) -> tuple[dict, float, float]:
        """(last step event, engine CPU seconds, readers' CPU seconds) now."""
        cpu = sum(psutil.Process(self.pid).cpu_times()[:2])
        readers = sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in self.readers)
        return last_step(self.run), cpu, readers

    def check(self, seconds: float) -> None:
        if self.watched:
            system = [e for e in read_events(self.run / "events.jsonl")[0] if e["type"] == "system"]
            assert len(system) >= seconds * 0.8, f"only {len(system)} system events in {seconds} s"
            assert all(p.poll() is None for p in self.readers), "a reader died"

    def stop(self) -> None:
        try:
            client.request(self.run, "stop", timeout=120)
        except Exception:  # noqa: BLE001 - whatever went wrong, the kill below ends it
            pass
        if self.pid and client.pid_alive(self.pid):  # never leave an engine behind
            os.kill(self.pid, signal.SIGKILL)
        for p in self.readers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_warm(engines: list[Engine], steps: int = 30, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((last_step(e.run) or {}).get("step", 0) >= steps for e in engines):
            time.sleep(1.0)  # and let the readers catch up with the history
            return
        time.sleep(0.2)
    raise SystemExit(f"error: the engines made no progress in {timeout} s; see their engine.log")


def window(engines: list[Engine], seconds: float) -> list[tuple[float, float, float]]:
    """Per engine: (tokens/s, engine CPU s per 1k tokens, readers' % of a core) over the same window."""
    before = [e.mark() for e in engines]
    time.sleep(seconds)
    after = [e.mark() for e in engines]
    out = []
    for e, (s0, c0, r0), (s1, c1, r1) in zip(engines, before, after, strict=True):
        e.check(seconds)
        tokens, wall = s1["tokens"] - s0["tokens"], s1["t"] - s0["t"]
        out.append((tokens / wall, 1000 * (c1 - c0) / tokens, 100 * (r1 - r0) / wall))
    return out


def run_round(root: Path, r: int, data: Path, args) -> tuple[tuple, tuple]:
    """One quiet and one watched measurement: side by side, or (--apart) one after the other."""
    kinds = (False, True) if r % 2 == 0 else (True, False)  # alternate who starts first
    engines = [Engine(root / f"{'watched' if w else 'quiet'}{r}", w) for w in kinds]
    results = {}
    try:
        if args.apart:
            for e in engines:
                e.start(data, args.threads)
                wait_warm([e])
                results[e.watched] = window([e], args.seconds)[0]
                e.stop()
        else:
            for e in engines:
                e.start(data, args.threads)
            wait_warm(engines)
            for e, result in zip(engines, window(engines, args.seconds), strict=True):
                results[e.watched] = result
    finally:
        for e in engines:
            e.stop()
    return results[False], results[True]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a prepared dataset folder (default: prepare one)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per round")
    parser.add_argument("--rounds", type=int, default=3, help="quiet/watched pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per engine (0 = torch's default)")
    parser.add_argument("--apart", action="store_true", help="one engine after the other, not side by side")
    args = parser.parse_args()

    overheads, cpu_overheads, quiet, watched = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="engine-overhead-") as tmp:
        root = Path(tmp)
        data = args.data or prepare_data(root)
        for r in range(args.rounds):
            (q, qc, _), (w, wc, readers) = run_round(root, r, data, args)
            quiet.append(q)
            watched.append(w)
            overheads.append(100 * (q - w) / q)
            cpu_overheads.append(100 * (wc - qc) / qc)
            print(f"round {r + 1}: quiet {q:9,.0f} tokens/s ({qc:.4f} CPU s/1k tokens) | watched {w:9,.0f} "
                  f"tokens/s ({wc:.4f} CPU s/1k tokens; readers {readers:.1f}% of a core) | "
                  f"overhead {overheads[-1]:+.2f}%", flush=True)
    q, w = statistics.median(quiet), statistics.median(watched)
    how = "one after the other" if args.apart else "side by side, same seconds"
    print(f"no reader, no stats:               {q:9,.0f} tokens/s (median of {args.rounds}, {how})")
    print(f"2 live readers + 1 s system stats: {w:9,.0f} tokens/s")
    print(f"engine CPU per token: {statistics.median(cpu_overheads):+.2f}% (median)")
    print(f"quiet={q:.0f} watched={w:.0f} overhead={statistics.median(overheads):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

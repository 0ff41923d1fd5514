"""Bits per byte on tiny Shakespeare against wall time, on the CPU, with the workbench engine.

    python bench/cpu_shakespeare.py --data ../shared/data/tinyshakespeare/input.txt --seconds 53

The last 10% of the characters are the validation split. The clock starts before the data is
prepared: tokenizer training, encoding, model set-up, training and the final full validation
pass all count against --seconds (only the Python/torch import and the optional prepare-speed
measurement, which runs first, do not). The trainer gets the time that is left as its
`train.max_seconds` budget, so its learning-rate schedule decays over exactly the time it has.
Before that, it measures `workbench prepare` throughput and peak RSS on a >= 100 MB corpus built
from the same text (--prepare-mb 0 skips it). The last line is `val_bpb=X.XXX seconds=S`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prepare_speed import measure
from workbench.engine import config as config_mod
from workbench.engine.data.prepare import prepare
from workbench.engine.events import read_events
from workbench.engine.formatting import count
from workbench.engine.run_setup import create_run
from workbench.engine.train import train

FINAL_EVAL_RESERVE_S = 2.0  # the full validation pass and the final checkpoint, after the budget


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="tiny Shakespeare input.txt")
    parser.add_argument("--seconds", type=float, default=53.0, help="wall-time budget")
    parser.add_argument("--config", default=str(ROOT / "examples" / "cpu-shakespeare.toml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--prepare-mb", type=float, default=100, help="prepare-speed corpus size; 0 skips it")
    parser.add_argument("--quiet", action="store_true", help="print no training steps")
    args = parser.parse_args()

    if args.prepare_mb:
        for mb in (args.prepare_mb / 4, args.prepare_mb):
            r = measure(args.data, mb)
            print(f"prepare {r['mb']:.1f} MB: {r['mb_per_s']:.2f} MB/s, peak RSS {r['peak_rss_mb']:.1f} MB "
                  f"({r['seconds']:.1f} s)", flush=True)

    start = time.monotonic()
    text = Path(args.data).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    with tempfile.TemporaryDirectory(prefix="wb-shakespeare-") as tmp:
        tmp = Path(tmp)
        (tmp / "train.txt").write_text(text[:cut], encoding="utf-8")
        (tmp / "val.txt").write_text(text[cut:], encoding="utf-8")
        report = prepare([tmp / "train.txt"], tmp / "data",
                         {"vocab_size": args.vocab_size, "val_sources": [str(tmp / "val.txt")]})
        print(f"prepared in {time.monotonic() - start:.1f} s: {report['kept']['documents']} documents, "
              f"{report['splits']['train']['tokens']} train / {report['splits']['val']['tokens']} val tokens, "
              f"{report['tokenizer']['bytes_per_token']:.2f} bytes per token", flush=True)
        budget = args.seconds - (time.monotonic() - start) - FINAL_EVAL_RESERVE_S
        cfg = config_mod.load(args.config, [f"data.path={tmp / 'data'}", f"train.max_seconds={budget:.2f}",
                                            *args.set])
        echo = None if args.quiet else (lambda line: print(line, flush=True))
        train(create_run(tmp / "run", cfg), echo=echo, handle_signals=False)
        events, _ = read_events(tmp / "run" / "events.jsonl")
    evals = [e for e in events if e["type"] == "eval"]
    steps = [e for e in events if e["type"] == "step"]
    seconds = time.monotonic() - start
    print(f"{steps[-1]['step']} steps, {count(steps[-1]['tokens'])} tokens; config {args.config} "
          f"{' '.join(args.set)}")
    print(f"val_bpb={evals[-1]['val_bpb']:.3f} seconds={seconds:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

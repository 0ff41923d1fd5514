"""Reply latency: the warm chat service (workbench.engine.serve) against a cold `workbench sample`.

    python bench/generate.py [--run RUN] [--data DIR] [--steps 30] [--replies 5] [--max-tokens 100]
                             [--temperature 0.8] [--cold 2] [--json]

--run takes a run (one that does not exist yet is trained there first); without it, the `tiny`
preset (4 layers, d_model 128, context 128) is trained for --steps steps on the CPU, on ~2 MB of
the built-in corpus prepared in a temp folder (or in --data, kept there for the next time).
Throughput does not depend on what the weights learned.

warm: the checkpoint loaded once in this process (as `workbench serve` / `workbench chat` hold it);
      one reply to warm up, then --replies replies to a one-line user turn, each measured from the
      call (prompt rendering included) to its first text piece, and its tokens over its whole time.
cold: `workbench sample RUN --max-tokens M` as a new process, --cold times: the wall time to
      its output (the first token a user sees) and tokens over that wall time.
Medians are reported; "per CPU second" (tokens over the process's CPU time) is what the warm
service gives on a core of its own, which a busy shared machine's wall clock does not show.
The last line is `warm_first_token_ms=.. warm_tokens_per_s=.. cold_...`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = [{"role": "user", "content": "What does os.path.join do?"}]


def prepare_data(out: Path, max_chars: int = 2_000_000) -> Path:
    """~2 MB of the built-in corpus prepared into `out` (the default vocabulary), unless it is there."""
    from workbench.engine.data.builtin import builtin_documents
    from workbench.engine.data.prepare import prepare

    if (out / "train.bin").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / f"{out.name}.corpus.jsonl"
    total = 0
    with open(corpus, "w", encoding="utf-8") as f:
        for _, text in builtin_documents(4000):
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total >= max_chars:
                break
    prepare([corpus], out, {"val_fraction": 0.05})
    corpus.unlink()
    return out


def train_tiny(run: Path, data: Path, steps: int) -> Path:
    from workbench.engine import config as config_mod
    from workbench.engine.run_setup import create_run
    from workbench.engine.train import train

    cfg = config_mod.load(preset="tiny", overrides=[f"train.max_steps={steps}", "train.device=cpu",
                                                     f"checkpoint.interval={steps}", "eval.interval=0",
                                                     "eval.sample_interval=0"])
    cfg.data.path = str(data)
    state = train(create_run(run, cfg), echo=None)
    if state != "finished":
        raise SystemExit(f"training the tiny preset ended {state}")
    return run


def warm(run: Path, replies: int, max_tokens: int, temperature: float) -> dict:
    from workbench.engine.serve import ChatService

    t0 = time.perf_counter()
    service = ChatService.open(run)
    load_s = time.perf_counter() - t0
    max_tokens = min(max_tokens, service.seq_len - 16)
    service.chat(PROMPT, max_tokens=max_tokens, temperature=temperature, seed=0).result()  # warm-up
    first, rates, cpu_rates, tokens = [], [], [], []
    for i in range(replies):
        t, cpu = time.perf_counter(), time.process_time()
        gen = service.chat(PROMPT, max_tokens=max_tokens, temperature=temperature, seed=i + 1)
        next(iter(gen), None)
        first.append(time.perf_counter() - t)
        gen.result()
        rates.append(gen.tokens / (time.perf_counter() - t))
        cpu_rates.append(gen.tokens / (time.process_time() - cpu))  # what a core of its own would give
        tokens.append(gen.tokens)
    return {"load_s": load_s, "first_token_ms": 1e3 * statistics.median(first),
            "tokens_per_s": statistics.median(rates), "tokens_per_cpu_s": statistics.median(cpu_rates),
            "tokens": statistics.median(tokens),
            "max_tokens": max_tokens, "threads": _threads()}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def cold(run: Path, times: int, max_tokens: int, temperature: float) -> dict:
    from workbench.engine.data.tokenizer import Tokenizer

    tok = Tokenizer.load(run / "tokenizer.model")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    walls, rates, tokens = [], [], []
    for i in range(times):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "workbench.cli", "sample", str(run), "--max-tokens",
                              str(max_tokens), "--temperature", str(temperature), "--seed", str(i), "--json"],
                             capture_output=True, text=True, env=env, check=True)
        wall = time.perf_counter() - t
        n = len(tok.encode(json.loads(out.stdout)["text"]))  # re-encoded: close to the tokens sampled
        walls.append(wall)
        rates.append(n / wall)
        tokens.append(n)
    return {"first_token_ms": 1e3 * statistics.median(walls), "tokens_per_s": statistics.median(rates),
            "tokens": statistics.median(tokens)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path,
                        help="a run to measure; if it does not exist, the tiny run is trained there (default: a temp)")
    parser.add_argument("--data", type=Path,
                        help="dataset folder for the tiny run, prepared there if missing (default: a temp one)")
    parser.add_argument("--steps", type=int, default=30, help="training steps of the tiny run")
    parser.add_argument("--replies", type=int, default=5, help="measured warm replies")
    parser.add_argument("--cold", type=int, default=2, help="cold `workbench sample` runs")
    parser.add_argument("--max-tokens", type=int, default=100, help="tokens per reply (capped by the context)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        run = args.run
        if run is None or not (run / "config.toml").is_file():
            data = prepare_data(args.data or Path(tmp) / "data")
            run = train_tiny(run or Path(tmp) / "run", data, args.steps)
        w = warm(run, args.replies, args.max_tokens, args.temperature)
        c = cold(run, args.cold, w["max_tokens"], args.temperature)
    result = {"warm": w, "cold": c, "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"warm service ({w['threads']} torch thread(s), loaded in {w['load_s']:.2f} s): first token "
              f"{w['first_token_ms']:.1f} ms, {w['tokens_per_s']:.0f} tokens/s ({w['tokens']:.0f} tokens a reply; "
              f"{w['tokens_per_cpu_s']:.0f} per CPU second)")
        print(f"cold `workbench sample`: output after {c['first_token_ms'] / 1e3:.2f} s, "
              f"{c['tokens_per_s']:.0f} tokens/s over the wall time ({c['tokens']:.0f} tokens)")
        print(f"(load average {result['load_average']:.1f} on {result['cpus']} CPUs: a busy machine slows both)")
    print(f"warm_first_token_ms={w['first_token_ms']:.1f} warm_tokens_per_s={w['tokens_per_s']:.0f} "
          f"cold_first_output_s={c['first_token_ms'] / 1e3:.2f} cold_tokens_per_s={c['tokens_per_s']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

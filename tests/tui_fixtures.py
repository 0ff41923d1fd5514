"""A fixed, deterministic run directory for TUI tests and snapshots (no engine, no torch).

`make_demo_run(parent)` writes runs/demo-like folder: events.jsonl of a finished 300-step
run (steps, evals, samples, checkpoints, system stats with one GPU, log lines), three
checkpoint folders and a ratings.jsonl. Every value, time included, is fixed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from event_fixtures import complete

T0 = 1_700_000_000.0  # fixed clock: snapshots never depend on when they were taken
MAX_STEPS = 300
GPU = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "mem_total_bytes": 80 * 2**30, "power_limit_w": 700.0}


def _line(t: float, type_: str, **fields) -> str:
    event = complete({"type": type_, **fields}, round(T0 + t, 3))  # a whole event of the current schema, checked
    return json.dumps(event, separators=(",", ":")) + "\n"


def demo_events(max_steps: int = MAX_STEPS, finished: bool = True) -> str:
    out = [_line(0, "state", state="starting"),
           _line(0.5, "log", level="info", message="device cpu · kernels torch (reference)"),
           _line(1, "state", state="running", device=GPU["name"], dtype="bfloat16", kernels="cupy")]
    tokens_per_step = 4096
    for step in range(1, max_steps + 1):
        t = 1 + step * 0.5
        warm = min(1.0, step / 30)
        lr = 3e-4 * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max_steps)))
        loss = 3.1 + 6.0 * math.exp(-step / 40) + 0.08 * math.sin(step * 1.7)
        out.append(_line(t, "step", step=step, max_steps=max_steps, loss=round(loss, 4), lr=lr,
                         grad_norm=round(1.5 * math.exp(-step / 100) + 0.3 + 0.05 * math.cos(step), 4),
                         tokens=step * tokens_per_step, tokens_per_s=8000 + 400 * math.sin(step / 9),
                         mfu=0.012 + 0.001 * math.sin(step / 9), eta_s=(max_steps - step) * 0.5,
                         elapsed_s=step * 0.5))
        if step % 10 == 0:
            k = step // 10
            out.append(_line(t + 0.1, "system", cpu_percent=90 + 5 * math.sin(k), process_cpu_percent=180.0,
                             cpu_count=2, rss_bytes=900 * 2**20, ram_used_bytes=int((6 + 0.1 * k) * 2**30),
                             ram_total_bytes=24 * 2**30,
                             gpus=[{**GPU, "util_percent": 60 + 30 * math.sin(k / 3),
                                    "mem_used_bytes": int((20 + 0.5 * k) * 2**30), "temp_c": 55 + k % 10,
                                    "power_w": 300 + 10 * k, "sm_clock_mhz": 1980}], engine_gpu=None))
        if step % 50 == 0:
            val = 3.3 + 6.0 * math.exp(-step / 40)
            out.append(_line(t + 0.2, "eval", step=step, val_loss=round(val, 4), val_ppl=math.exp(val),
                             val_bpb=round(val / math.log(2) / 3.5, 4)))
        if step % 100 == 0:
            out.append(_line(t + 0.3, "sample", step=step, prompt="The list",
                             text=f"The list of arguments is passed to the function (step {step})."))
            out.append(_line(t + 0.4, "checkpoint", step=step, path=f"checkpoints/step_{step:06d}",
                             val_loss=round(3.3 + 6.0 * math.exp(-step / 40), 4)))
    if finished:
        out.append(_line(2 + max_steps * 0.5, "state", state="finished"))
    return "".join(out)


def demo_votes() -> list[dict]:
    """Fixed votes: step_000300 beats step_000200 beats step_000100, mostly."""
    from workbench import ratings

    plan = [("step_000300", "step_000100", "a")] * 6 + [("step_000300", "step_000200", "a")] * 4 + \
           [("step_000200", "step_000300", "a")] * 2 + [("step_000200", "step_000100", "a")] * 4 + \
           [("step_000100", "step_000200", "tie")] * 2 + [("step_000100", "step_000300", "both_bad")] * 2
    votes = []
    def side(name: str, seed: int) -> dict:
        return {"text": f"text from {name}", "checkpoint": name, "settings": {"temperature": 0.8, "top_p": 0.95,
                                                                              "seed": seed}}

    for i, (a, b, verdict) in enumerate(plan):
        votes.append(ratings.make_vote(f"prompt {i}", side(a, i), side(b, i), verdict, when=T0 + i))
    return votes


def make_demo_run(parent: Path, name: str = "demo", votes: bool = True) -> Path:
    run = Path(parent) / name
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(f"[train]\nmax_steps = {MAX_STEPS}\n")
    (run / "events.jsonl").write_text(demo_events())
    for step in (100, 200, 300):
        ckpt = run / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(exist_ok=True)
        (ckpt / "state.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "latest").write_text("step_000300\n")
    if votes:
        from workbench import ratings

        for vote in demo_votes():
            ratings.append_rating(run / "ratings.jsonl", vote)
    return run


def fake_generate(run_dir, checkpoint: str, prompt: str, settings: dict) -> str:
    """Deterministic stand-in for the sampler, for snapshots only (the Pilot tests use the real engine)."""
    import zlib

    words = ["the", "function", "returns", "a", "list", "of", "values", "in", "order", "when", "called", "with"]
    seed = zlib.crc32(f"{checkpoint}|{sorted(settings.items())}".encode())
    picked = [words[(seed >> (i % 24) ^ i * 7) % len(words)] for i in range(14)]
    return f"{prompt} {' '.join(picked)}."

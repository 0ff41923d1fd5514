"""A full training step of a GPT-2-small-shaped model: our CuPy kernels against the PyTorch reference ops.

    python bench/train_step.py                        # CUDA: reference vs ours, bf16, 16 x 1024 tokens a step
    python bench/train_step.py --compile              # also both under torch.compile
    python bench/train_step.py --tiny                 # a quick smoke test of the same path at a tiny shape
    python bench/train_step.py --device cpu --tiny    # no GPU: the reference ops only, in seconds

Each variant is the engine's own training, not a copy of it: `workbench.engine.train.Trainer.setup()` builds
the GPT (workbench.engine.model), the optimizer (`ops.adamw` over `model.param_groups`), the device, dtype and
peak FLOP/s (workbench.engine.device) exactly as `workbench train` does, with train.kernels = "torch" or "cupy"
and train.compile as the variant says. Each timed step is `Trainer.train_step()`: a batch from the
train memmap, forward and backward under bf16 autocast, gradient clipping, the step's one host sync
(loss and grad norm), the optimizer step. A step that comes out non-finite stops the benchmark.

Shape: 12 layers, 768 wide, 12 heads, T = 1024, SwiGLU, tied embeddings, V = 32768 (--vocab).
Data: a prepared dataset (--data), else ~300 kB of the built-in corpus prepared in a temp folder
with a 1024-token vocabulary; the model keeps its own vocab (which ids occur does not change the cost).
Timing: CUDA events around every step after --warmup steps; step ms is the median of --steps,
tokens/s follows from it, MFU is workbench.engine.device's for the detected GPU (n/a when not in the table),
peak memory is torch's max allocated during the timed steps. Loss is the last timed step's: with the
same seed and batches, ours and the reference should agree to bf16 noise.

Targets (issue 5): ours >= 1.2x the reference's tokens/s, MFU >= 50% of the GPU's dense bf16 peak.
They are judged at the full shape only: every pair that ran must reach 1.2x (cupy / torch, and with
--compile cupy+compile / torch+compile), and the best MFU of ours must reach 50%.
The last line is `speedup=X mfu=Y verdict=PASS|FAIL|n/a` (speedup: cupy / torch, uncompiled).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.engine_overhead import prepare_data
from workbench.engine import config as config_mod
from workbench.engine.errors import WorkbenchError
from workbench.engine.formatting import count as human
from workbench.engine.run_setup import create_run
from workbench.engine.train import Trainer

GPT2_SMALL = {"n_layer": 12, "n_head": 12, "d_model": 768, "seq_len": 1024}
TINY = {"n_layer": 2, "n_head": 2, "d_model": 64, "seq_len": 64}
SPEEDUP_TARGET, MFU_TARGET = 1.2, 0.50


@dataclass(frozen=True)
class Result:
    variant: str  # "torch", "cupy", "torch+compile", "cupy+compile"
    step_ms: float
    tokens_per_s: float
    mfu: float | None
    peak_gib: float | None  # None on the CPU
    loss: float


def variant_name(kernels: str, compiled: bool) -> str:
    return kernels + ("+compile" if compiled else "")


def bench_config(args, data: Path, kernels: str, compiled: bool) -> config_mod.RunConfig:
    shape = TINY if args.tiny else GPT2_SMALL
    return config_mod.from_dict({
        "data": {"path": str(data)},
        "model": {**shape, "vocab_size": args.vocab},
        "train": {"batch_size": args.batch_size, "device": args.device, "kernels": kernels,
                  "compile": compiled, "max_steps": args.warmup + args.steps, "seed": 1337},
        "eval": {"interval": 0},
        "checkpoint": {"interval": 0},
    })


def timed_steps(trainer: Trainer, steps: int) -> tuple[list[float], float]:
    """(milliseconds of each step, the last step's loss). On CUDA an event marks every step boundary
    on the current stream, so a step's time includes all its GPU work; on the CPU a step is synchronous."""
    cuda = trainer.device.type == "cuda"
    marks, loss = [], float("nan")
    for i in range(steps + 1):
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())
        if i < steps:
            loss = checked_step(trainer)
    if cuda:
        marks[-1].synchronize()
        return [a.elapsed_time(b) for a, b in itertools.pairwise(marks)], loss
    return [(b - a) * 1000 for a, b in itertools.pairwise(marks)], loss


def checked_step(trainer: Trainer) -> float:
    loss, norm, _, applied = trainer.train_step()
    if not applied:  # a skipped optimizer step would time less work than a real one
        raise WorkbenchError(f"step {trainer.step} gave a non-finite loss ({loss}) or grad norm ({norm}); "
                             "the timings would be meaningless")
    return loss


def run_variant(args, data: Path, run_root: Path, kernels: str, compiled: bool) -> tuple[Result, Trainer]:
    name = variant_name(kernels, compiled)
    trainer = Trainer(create_run(run_root / name, bench_config(args, data, kernels, compiled)), echo=None)
    try:
        trainer.setup()
        for _ in range(args.warmup):  # the first steps allocate optimizer state and, compiled, compile
            checked_step(trainer)
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, loss = timed_steps(trainer, args.steps)
    finally:
        trainer.events.close()
    step_ms = statistics.median(times)
    cfg = trainer.cfg
    tps = cfg.train.batch_size * cfg.model.seq_len * cfg.train.grad_accum / (step_ms / 1000)
    peak = torch.cuda.max_memory_allocated(trainer.device.device) / 2**30 if cuda else None
    return Result(name, step_ms, tps, trainer.device.mfu(trainer.flops_per_token, tps), peak, loss), trainer


def release(compiled: bool) -> None:
    """Free the last variant's model, optimizer and compiled graphs (drop the Trainer first)."""
    if compiled:  # importing torch._dynamo costs seconds, so only when something was compiled
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def verdicts(args, results: list[Result], peak_flops: float | None) -> list[str]:
    """The target lines and the last line (speedup=... mfu=... verdict=...)."""
    by_name = {r.variant: r for r in results}
    lines, passed, speedups = [], [], []
    for compiled in (False, True):
        ref, ours = by_name.get(variant_name("torch", compiled)), by_name.get(variant_name("cupy", compiled))
        if ref and ours:
            x = ours.tokens_per_s / ref.tokens_per_s
            speedups.append(x)
            passed.append(x >= SPEEDUP_TARGET)
            lines.append(f"speedup {ours.variant} / {ref.variant}: {x:.2f}x  (target >= {SPEEDUP_TARGET}x)  "
                         f"{'PASS' if passed[-1] else 'FAIL'}")
    ours_mfu = [r.mfu for r in results if r.variant.startswith("cupy") and r.mfu is not None]
    best_mfu = max(ours_mfu) if ours_mfu else None
    if best_mfu is not None:
        passed.append(best_mfu >= MFU_TARGET)
        lines.append(f"MFU of ours (best variant): {percent(best_mfu)} of {human(peak_flops)}FLOP/s  "
                     f"(target >= {percent(MFU_TARGET)})  {'PASS' if passed[-1] else 'FAIL'}")
    if args.tiny:
        verdict, why = "n/a", "the targets are for the GPT-2-small shape, not --tiny"
    elif not speedups:
        verdict, why = "n/a", "it needs both --kernels torch and cupy, and CuPy needs CUDA"
    elif best_mfu is None:
        verdict, why = "n/a", "no peak FLOP/s for this device in workbench.engine.estimates, so no MFU"
    else:
        verdict, why = ("PASS" if all(passed) else "FAIL"), ""
    if why:
        lines.append(f"targets: not judged ({why})")
    speedup = f"{speedups[0]:.2f}" if speedups else "n/a"
    lines.append(f"speedup={speedup} mfu={percent(best_mfu)} verdict={verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="2 layers, 64 wide, T = 64 (a smoke test)")
    parser.add_argument("--kernels", nargs="+", choices=["torch", "cupy"], default=None,
                        help="variants to run (default: torch and cupy on CUDA, torch on the CPU)")
    parser.add_argument("--compile", action="store_true", help="also run each variant under torch.compile")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences a step (default 16; 4 at --tiny)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="model vocab (default 32768; at --tiny the prepared tokenizer's)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (more with --compile)")
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: prepare a small one in a temp folder)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: bench/train_step.py needs a CUDA GPU (PyTorch sees none); "
              "`--device cpu --tiny` runs the reference ops on the CPU", file=sys.stderr)
        return 1
    kernels = args.kernels or (["torch", "cupy"] if args.device == "cuda" else ["torch"])
    if "cupy" in kernels:
        from workbench.kernels.cupy_launch import cupy_missing

        if (why := cupy_missing()) is not None:
            print(f"error: the CuPy kernels cannot run here: {why} (`--kernels torch` runs the reference alone)",
                  file=sys.stderr)
            return 1
    if args.batch_size is None:
        args.batch_size = 4 if args.tiny else 16
    if args.vocab is None:
        args.vocab = 0 if args.tiny else 32768
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        print("error: --steps and --batch-size must be at least 1, --warmup at least 0", file=sys.stderr)
        return 1

    variants = [(k, compiled) for compiled in ((False, True) if args.compile else (False,)) for k in kernels]
    results: list[Result] = []
    peak_flops = None
    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        tmp = Path(tmp)
        data = args.data or prepare_data(tmp, max_chars=300_000)
        try:
            for k, compiled in variants:
                result, trainer = run_variant(args, data, tmp, k, compiled)
                if not results:  # the header, once the first variant told us the device and model
                    print(header(args, trainer))
                    print(f"{'variant':<14} {'tokens/s':>11} {'step ms':>9} {'MFU':>7} {'peak GiB':>9} {'loss':>8}")
                results.append(result)
                peak = "n/a" if result.peak_gib is None else f"{result.peak_gib:.2f}"
                print(f"{result.variant:<14} {result.tokens_per_s:>11,.0f} {result.step_ms:>9.2f} "
                      f"{percent(result.mfu):>7} {peak:>9} {result.loss:>8.4f}", flush=True)
                peak_flops = trainer.device.peak_flops
                trainer = None
                release(compiled)
        except WorkbenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except torch.OutOfMemoryError:
            print(f"error: out of GPU memory at --batch-size {args.batch_size}; try a smaller one", file=sys.stderr)
            return 1
    for line in verdicts(args, results, peak_flops):
        print(line)
    return 0


def header(args, trainer: Trainer) -> str:
    m, dev = trainer.cfg.model, trainer.device
    peak = "no peak in the table" if not dev.peak_flops else f"peak {human(dev.peak_flops)}FLOP/s"
    return (f"# {datetime.date.today()} {dev.name} ({peak})  torch {torch.__version__}  "
            f"{str(dev.dtype).removeprefix('torch.')}\n"
            f"# model {m.n_layer}L x {m.d_model} x {m.n_head}H, T={m.seq_len}, V={m.vocab_size}: "
            f"{human(trainer.model.num_params())} params, {human(trainer.flops_per_token)}FLOPs/token; "
            f"batch {args.batch_size} x {m.seq_len} tokens; median of {args.steps} steps after {args.warmup} warm-up")


if __name__ == "__main__":
    sys.exit(main())

"""Our CUDA kernels against PyTorch eager and torch.compile, at GPT-2-small shapes (GPU only).

    python bench/kernels.py                       # every op, bf16
    python bench/kernels.py --ops rmsnorm rope --dtype float32 --iters 100

For each op: the time of one forward+backward (for an optimizer: one step), median over
--iters runs timed with CUDA events after warm-up, for three implementations side by side:
"ours" (the CuPy kernel), "eager" (the PyTorch reference) and "compile" (torch.compile of the
reference); and the peak memory each allocates beyond its inputs during one run.
Shapes: B*T = 8192 tokens (B=8, T=1024), C = 768, 12 heads of 64, V = 32768, SwiGLU hidden 3072.

Adding an op: write `def build_<op>(dtype, impl) -> step` (step() runs the work once; build
makes the inputs and may warm nothing up) and add `OpBench("<op>", build_<op>, note)` to BENCHES
(note: optional, printed under the op's line, e.g. what "compile" stands for there).
`fwd_bwd(fn, inputs)` makes the usual step: outputs = fn(*inputs), then backward with fixed
random output gradients (torch.autograd.grad, so nothing accumulates between runs).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

IMPLS = ("ours", "eager", "compile")
B, T, C, HEADS, HEAD_DIM, V, HIDDEN = 8, 1024, 768, 12, 64, 32768, 3072
N = B * T


@dataclass(frozen=True)
class OpBench:
    name: str
    build: Callable[[torch.dtype, str], Callable[[], None]]  # (dtype, impl) -> step
    note: str = ""  # printed under the op's line, e.g. what "compile" means for an optimizer


def pick(impl: str, ours: Callable, reference: Callable) -> Callable:
    if impl == "ours":
        return ours
    if impl == "eager":
        return reference
    return torch.compile(reference)


def randn(*shape, dtype, scale=1.0, grad=True):
    t = torch.randn(shape, device="cuda", dtype=torch.float32).mul_(scale).to(dtype)
    return t.requires_grad_(grad)


def fwd_bwd(fn: Callable, inputs: list) -> Callable[[], None]:
    """A step: forward, then backward with fixed output gradients, grads w.r.t. every input that needs one."""
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grad_outputs: list = []

    def step():
        out = fn(*inputs)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        if not grad_outputs:
            grad_outputs.extend(torch.randn_like(o) for o in outs)
        torch.autograd.grad(outs, wrt, grad_outputs)

    return step


# ------------------------------------------------------------------ the ops
def build_rmsnorm(dtype, impl):
    from workbench.kernels.rmsnorm import add_rms_norm_cupy, add_rms_norm_reference

    x, delta = randn(N, C, dtype=dtype), randn(N, C, dtype=dtype)
    w = randn(C, dtype=torch.float32)
    fn = pick(impl, add_rms_norm_cupy, add_rms_norm_reference)
    return fwd_bwd(lambda x, d, w: fn(x, d, w, 1e-5), [x, delta, w])


def build_rope(dtype, impl):
    from workbench.kernels.rope import rope_cupy, rope_frequencies, rope_reference

    q, k = randn(B, T, HEADS, HEAD_DIM, dtype=dtype), randn(B, T, HEADS, HEAD_DIM, dtype=dtype)
    cos, sin = rope_frequencies(T, HEAD_DIM, 10000.0, device="cuda")
    fn = pick(impl, rope_cupy, rope_reference)
    return fwd_bwd(lambda q, k: fn(q, k, cos, sin), [q, k])


def build_swiglu(dtype, impl):
    from workbench.kernels.swiglu import swiglu_cupy, swiglu_reference

    gate, up = randn(N, HIDDEN, dtype=dtype), randn(N, HIDDEN, dtype=dtype)
    return fwd_bwd(pick(impl, swiglu_cupy, swiglu_reference), [gate, up])


def build_linear_cross_entropy(dtype, impl):
    """Loss averaged over the tokens (as training does), so the upstream gradient is uniform."""
    from workbench.kernels.linear_cross_entropy import linear_cross_entropy_cupy, linear_cross_entropy_reference

    h, w = randn(N, C, dtype=dtype), randn(V, C, dtype=dtype, scale=0.02)
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::50] = -1  # a few ignored positions
    fn = pick(impl, linear_cross_entropy_cupy, linear_cross_entropy_reference)
    return fwd_bwd(lambda h, w: fn(h, w, targets, -1).mean(), [h, w])


def gpt2_small_params() -> list[list[torch.Tensor]]:
    """fp32 master weights of a 12-layer, 768-wide model (SwiGLU 3072, V 32768): ~150M parameters,
    in two groups (matrices with weight decay, norm gains without)."""
    matrices, gains = [torch.empty(V, C, device="cuda")], [torch.empty(C, device="cuda")]
    for _ in range(12):
        matrices += [torch.empty(3 * C, C, device="cuda"), torch.empty(C, C, device="cuda"),
                     torch.empty(HIDDEN, C, device="cuda"), torch.empty(HIDDEN, C, device="cuda"),
                     torch.empty(C, HIDDEN, device="cuda")]
        gains += [torch.empty(C, device="cuda"), torch.empty(C, device="cuda")]
    groups = [[torch.nn.Parameter(t.normal_(0, 0.02)) for t in matrices],
              [torch.nn.Parameter(t.fill_(1.0)) for t in gains]]
    for p in groups[0] + groups[1]:
        p.grad = torch.randn_like(p).mul_(1e-3)
    return groups


def build_adamw(dtype, impl):
    """One optimizer step over fp32 params (the engine keeps fp32 masters under bf16 autocast, so
    --dtype does not apply). Here "eager" is torch.optim.AdamW(fused=True), the target to match, and
    "compile" is torch.compile of the default (foreach) AdamW's step."""
    from workbench.kernels.adamw import AdamW

    matrices, gains = gpt2_small_params()
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": gains, "weight_decay": 0.0}]
    hyper = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    if impl == "ours":
        return AdamW(groups, **hyper).step
    if impl == "eager":
        return torch.optim.AdamW(groups, fused=True, **hyper).step
    return torch.compile(torch.optim.AdamW(groups, foreach=True, **hyper).step)


BENCHES: list[OpBench] = [
    OpBench("rmsnorm", build_rmsnorm),
    OpBench("rope", build_rope),
    OpBench("swiglu", build_swiglu),
    OpBench("linear_cross_entropy", build_linear_cross_entropy),
    OpBench("adamw", build_adamw),
]


# ------------------------------------------------------------------ measuring
def measure(step: Callable[[], None], iters: int, warmup: int) -> tuple[float, float]:
    """(median milliseconds per step, peak MiB allocated beyond what existed before the step)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=[b.name for b in BENCHES], help="ops to run (default: all)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench/kernels.py needs a CUDA GPU (PyTorch sees none)", file=sys.stderr)
        return 1
    from workbench.kernels.cupy_launch import cupy_missing

    if (why := cupy_missing()) is not None:
        print(f"error: the CuPy kernels cannot run here: {why}", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    print(f"# {datetime.date.today()} {torch.cuda.get_device_name()}  torch {torch.__version__}  {args.dtype}  "
          f"B*T={N} C={C} V={V}  median of {args.iters}")
    print(f"{'op':<22} " + " ".join(f"{i + ' ms':>11}" for i in IMPLS)
          + f" {'x eager':>8} {'x compile':>9} " + " ".join(f"{i + ' MiB':>12}" for i in IMPLS))
    for bench in BENCHES:
        if args.ops and bench.name not in args.ops:
            continue
        ms, mib = {}, {}
        for impl in IMPLS:
            torch.cuda.empty_cache()
            ms[impl], mib[impl] = measure(bench.build(dtype, impl), args.iters, args.warmup)
        print(f"{bench.name:<22} " + " ".join(f"{ms[i]:>11.3f}" for i in IMPLS)
              + f" {ms['eager'] / ms['ours']:>8.2f} {ms['compile'] / ms['ours']:>9.2f} "
              + " ".join(f"{mib[i]:>12.1f}" for i in IMPLS))
        if bench.note:
            print(f"  ({bench.note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

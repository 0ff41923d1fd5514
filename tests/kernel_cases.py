"""The kernel tests' one home for backends, tolerances, shapes and comparison helpers.

Every kernel check is written once and runs on each `backend` (a fixture; a test module takes it
with `backend = kernel_cases.backend`), as Liger-Kernel's device-agnostic tests do:

  - "emulated": the kernels' own CUDA source on CPU tensors, through kernels/emulation/harness.py
    (skipped without a C++ compiler);
  - "cupy": CuPy on a CUDA device, marked `gpu` (pytest -m gpu; skipped without CUDA and CuPy).

The ops' real wrappers run on both; only the launches differ. Both backends record the names of
the kernels they launched (`backend.launches`), so a test can check which path ran.
`gpu_case(...)` is a parameter too large or slow to emulate (marked gpu, skipped on the
emulation); `@cupy_only` marks a test of something only CUDA has (streams, inductor, peak memory).
"""

from __future__ import annotations

import pytest
import torch

from workbench.kernels import cupy_launch
from workbench.kernels.emulation import harness

GPU_ONLY = "a GPU-only case: too large or slow to emulate"


def gpu_case(*values, id=None):
    """A parameter set only the GPU runs: marked gpu, and skipped by the emulated backend."""
    return pytest.param(*values, marks=pytest.mark.gpu, id=id)


def shape_id(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else None


# ---------------------------------------------------------------- shapes (odd ones, as Liger-Kernel's)
RMSNORM_SHAPES = [(3, 423, 213), (2, 37, 256), (3, 1032), (5, 1), gpu_case((8, 1024, 768)), gpu_case((2, 64, 4096))]
ROPE_SHAPES = [(3, 423, 2, 1, 64), (2, 7, 3, 3, 10), (1, 9, 4, 2, 32), (2, 33, 4, 2, 10),
               gpu_case(8, 1024, 12, 12, 64)]  # (B, T, H, Hk, D)
SWIGLU_SHAPES = [(3, 423, 213), (2, 16, 256), (7,), gpu_case((8, 1024, 2048))]
# linear + cross-entropy: (tokens, C, vocab, tokens per chunk; None: the op's own CHUNK_LOGITS)
LCE_SHAPES = [pytest.param((423, 213, 1000, 100), id="odd-5-chunks"),
              gpu_case((4096, 768, 32768, None), id="gpt2-small-chunked"),
              gpu_case((1000, 256, 50257, None), id="odd-vocab")]
LCE_CHUNK_VOCABS = [1000, 997, gpu_case(32768)]  # 16-byte accesses, the one-element path, a GPT-2 vocab
IGNORE = -1
# AdamW: parameter shapes (the last one is made a misaligned view) and the optimizer's chunking
ADAMW_CASES = [pytest.param([(37, 13), (1000,), (5,), (3, 7, 11), (300,)], dict(chunk_size=256, block=64),
                            id="small-chunks"),  # several chunks per tensor, ragged ends, 64-thread blocks
               gpu_case([(768, 2304), (768,), (50304, 768), (3, 7, 11), (1,)], {}, id="gpt2-small")]
# torch.optim.AdamW to compare with, and the rtol it allows: its single-tensor step does our
# arithmetic; its foreach and fused kernels order some of it differently
TORCH_ADAMW = [pytest.param(dict(foreach=False), 1e-6, id="torch-single"),
               pytest.param(dict(foreach=True), 1e-5, id="torch-foreach"),
               pytest.param(dict(fused=True), 1e-5, id="torch-fused")]

# ---------------------------------------------------------------- tolerances
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# (atol, rtol) per dtype, as Liger-Kernel's tests do: float32 differs from the reference by
# summation order only; bfloat16 by one rounding of the output (our kernels round once where
# the reference's autograd rounds twice, e.g. the residual's gradient)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2)}
# linear + cross-entropy: (rtol, atol as a fraction of the largest expected value) per backend and
# dtype, for the loss and for the gradients. float32: the matmuls sum in another order per chunk.
# bfloat16: the logits and their gradient are rounded to bf16 on both sides, at the same points;
# the CPU's chunked matmul gives each logit bitwise as the whole one does (so the loss agrees to
# float32 rounding), while cuBLAS may pick another kernel per chunk and land a logit one bf16 step
# apart.
LCE_TOL = {("emulated", torch.float32): dict(loss=(1e-5, 1e-6), grad=(1e-4, 1e-5)),
           ("emulated", torch.bfloat16): dict(loss=(1e-5, 1e-6), grad=(2e-2, 1e-2)),
           ("cupy", torch.float32): dict(loss=(1e-4, 1e-5), grad=(1e-4, 1e-5)),
           ("cupy", torch.bfloat16): dict(loss=(2e-2, 1e-2), grad=(2e-2, 1e-2))}


def assert_close(actual, expected, dtype, scale=1.0, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol, msg=what or None)


def lce_close(backend, kind, actual, expected, dtype, what=""):
    """The linear-CE's `kind` ("loss" or "grad") against the reference, for inputs of `dtype`."""
    rtol, atol = LCE_TOL[(backend.name, dtype)][kind]
    scale = expected.float().abs().max().item() or 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale,
                               msg=(lambda m: f"{kind} {what}: {m}"))


def grads(outputs, inputs, seed=1):
    """Gradients of sum(output * a fixed random weight) with respect to inputs (None where unused)."""
    device = outputs[0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen, device=device)).sum() for o in outputs)
    live = [i for i in inputs if i is not None]
    g = iter(torch.autograd.grad(loss, live))
    return [next(g) if i is not None else None for i in inputs]


# ---------------------------------------------------------------- backends
class RecordingCupyBackend(cupy_launch.CupyBackend):
    """CuPy's launcher, also keeping the kernel names, as the emulation's does."""

    def __init__(self):
        self.launches: list[str] = []

    def launch(self, source, name, *args, **kwargs) -> None:
        self.launches.append(name)
        super().launch(source, name, *args, **kwargs)


class Backend:
    """Where a test's kernels run: the device for its tensors and the launcher the ops use."""

    def __init__(self, name: str, device: str, launcher):
        self.name = name
        self.device = torch.device(device)
        self.launcher = launcher  # EmulationBackend or RecordingCupyBackend
        # inductor would build C++ for the CPU too, which takes far longer than the test
        self.compiler = "aot_eager" if name == "emulated" else "inductor"

    @property
    def launches(self) -> list[str]:
        return self.launcher.launches

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def randn(self, *shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=self.generator(seed), device=self.device) * scale).to(dtype)

    def leaf(self, *shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
        return self.randn(*shape, seed=seed, dtype=dtype, scale=scale).requires_grad_()

    def run_schedules(self, fn):
        """fn() under every thread schedule of the emulation (results bitwise equal, or a race is
        reported: harness.run_schedules); once on a GPU, whose schedule is its own."""
        if self.name != "emulated":
            return fn()
        try:
            return harness.run_schedules(lambda schedule: self._under(schedule, fn))
        finally:
            self.launcher.schedule = "forward"

    def _under(self, schedule, fn):
        self.launcher.schedule = schedule
        return fn()


EMULATED = pytest.param("emulated", id="emulated")
CUPY = pytest.param("cupy", marks=pytest.mark.gpu, id="cupy")
cupy_only = pytest.mark.parametrize("backend", [CUPY], indirect=True)


@pytest.fixture(params=[EMULATED, CUPY])
def backend(request, monkeypatch):
    if request.param == "emulated":
        if why := harness.compiler_missing():
            pytest.skip(why)
        if request.node.get_closest_marker("gpu"):
            pytest.skip(GPU_ONLY)
        launcher = harness.EmulationBackend()
        with cupy_launch.cpu_backend(launcher):  # the ops take CPU tensors inside
            yield Backend("emulated", "cpu", launcher)
    else:
        if why := cupy_launch.cupy_missing():
            pytest.skip(f"needs CUDA and CuPy: {why}")
        launcher = RecordingCupyBackend()
        monkeypatch.setattr(cupy_launch, "_cupy_backend", launcher)  # what backend_for gives CUDA tensors
        yield Backend("cupy", "cuda", launcher)

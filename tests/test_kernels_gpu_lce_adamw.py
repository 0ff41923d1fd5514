"""The fused linear + cross-entropy and the multi-tensor AdamW on a real GPU (pytest -m gpu),
against the PyTorch references with per-dtype tolerances, plus the peak-memory target."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.kernels import cupy_launch
from workbench.kernels import linear_cross_entropy as lce
from workbench.kernels.adamw import AdamW
from workbench.kernels.linear_cross_entropy import linear_cross_entropy_cupy as fused
from workbench.kernels.linear_cross_entropy import linear_cross_entropy_reference as reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(cupy_launch.cupy_missing() is not None, reason=cupy_launch.cupy_missing() or "")]

IGNORE = -100
CUDA = "cuda"


def inputs(n, c, vocab, dtype, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    h = torch.randn(n, c, device=CUDA, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, c, device=CUDA, generator=g) * 0.05).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), device=CUDA, generator=g)
    t[::7] = IGNORE
    return h, w, t


def close(actual, expected, dtype, what):
    # fp32: cuBLAS sums in another order per chunk. bf16: logits and their gradient are rounded
    # to bf16 on both sides, but a logit can land one bf16 step apart; scale-relative for the grads.
    scale = expected.float().abs().max().item() or 1.0
    tol = dict(rtol=1e-4, atol=1e-5 * scale) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2 * scale)
    torch.testing.assert_close(actual.float(), expected.float(), msg=lambda m: f"{what}: {m}", **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(423, 213, 1000), (4096, 768, 32768), (1000, 256, 50257)],
                         ids=["odd", "gpt2-small-chunked", "odd-vocab"])
def test_linear_cross_entropy_matches_reference(dtype, shape):
    h, w, t = inputs(*shape, dtype)
    loss, ref = fused(h, w, t, IGNORE), reference(h, w, t, IGNORE)
    close(loss, ref, dtype, "loss")
    assert (loss[t == IGNORE] == 0).all()
    for reduce in (lambda x: x.mean(), lambda x: (x * torch.linspace(0, 2, len(x), device=CUDA)).sum()):
        dh, dw = torch.autograd.grad(reduce(fused(h, w, t, IGNORE)), (h, w))
        rh, rw = torch.autograd.grad(reduce(reference(h, w, t, IGNORE)), (h, w))
        close(dh, rh, dtype, "dh")
        close(dw, rw, dtype, "dW")


def test_linear_cross_entropy_autocast_and_compile():
    h, w, t = inputs(512, 256, 5000, torch.float32, seed=1)
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        loss, ref = fused(h, w, t, IGNORE), reference(h, w, t, IGNORE)
    dh, dw = torch.autograd.grad(loss.mean(), (h, w))
    rh, rw = torch.autograd.grad(ref.mean(), (h, w))
    assert dw.dtype == torch.float32
    close(loss, ref, torch.bfloat16, "loss")
    close(dh, rh, torch.bfloat16, "dh")
    close(dw, rw, torch.bfloat16, "dW")

    compiled = torch.compile(lambda h, w: fused(h, w, t, IGNORE).mean(), fullgraph=True)
    dh, dw = torch.autograd.grad(compiled(h, w), (h, w))
    rh, rw = torch.autograd.grad(reference(h, w, t, IGNORE).mean(), (h, w))
    close(dh, rh, torch.float32, "dh (compiled)")
    close(dw, rw, torch.float32, "dW (compiled)")


@pytest.mark.parametrize("vocab", [32768, 997])
def test_chunk_kernel_on_gpu(vocab):
    x = torch.randn(64, vocab, device=CUDA).to(torch.bfloat16)
    t = torch.randint(0, vocab, (64,), device=CUDA)
    t[::5] = IGNORE
    loss, grad = torch.empty(64, device=CUDA), x.clone()
    lce.chunk_kernel(cupy_launch.backend_for(x.device, "test"), grad, t, loss, None, IGNORE, True)
    xf = x.float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(xf, t, ignore_index=IGNORE, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), xf.grad.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-5)


def test_linear_cross_entropy_peak_memory_is_a_quarter_of_unfused():
    """GPT-2-small shapes: B*T = 8192, C = 768, V = 32768, bf16."""
    h, w, t = inputs(8192, 768, 32768, torch.bfloat16, seed=2)

    def peak(fn):
        torch.cuda.synchronize()
        h.grad = w.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(h, w, t, IGNORE).mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours, unfused = peak(fused), peak(reference)
    print(f"peak memory above inputs: fused {ours / 2**20:.0f} MiB, unfused {unfused / 2**20:.0f} MiB "
          f"({100 * ours / unfused:.0f}%)")
    assert ours <= 0.25 * unfused


# --- AdamW ----------------------------------------------------------------------------------------

SHAPES = [(768, 2304), (768,), (50304, 768), (3, 7, 11), (1,)]


def params(dtype=torch.float32, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device=CUDA, generator=g).to(dtype)) for s in SHAPES]


def groups(ps):
    return [{"params": [ps[0], ps[2]], "weight_decay": 0.1}, {"params": [ps[1], ps[3], ps[4]], "weight_decay": 0.0}]


def grads(step, *lists):
    g = torch.Generator(device=CUDA).manual_seed(50 + step)
    for i, p in enumerate(lists[0]):
        grad = torch.randn(p.shape, device=CUDA, generator=g).to(p.dtype)
        for ps in lists:
            ps[i].grad = grad.clone()


@pytest.mark.parametrize("torch_kind", ["fused", "foreach"])
def test_adamw_matches_torch_on_gpu(torch_kind):
    a = params()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = AdamW(groups(a), lr=3e-3, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW(groups(b), lr=3e-3, betas=(0.9, 0.95), **{torch_kind: True})
    for step in range(6):
        grads(step, a, b)
        for opt in (ours, theirs):
            for group in opt.param_groups:
                group["lr"] = 3e-3 * (1 - step / 10)
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-9)

    # checkpoints move both ways (their fused step lives on the GPU, ours on the CPU)
    saved = copy.deepcopy(theirs.state_dict())
    again = AdamW(groups([torch.nn.Parameter(q.detach().clone()) for q in b]))
    again.load_state_dict(saved)
    assert all(s["step"].device.type == "cpu" and s["exp_avg"].dtype == torch.float32 for s in again.state.values())


def test_adamw_bf16_params_on_gpu():
    a = params(torch.bfloat16, seed=3)
    shadow = [torch.nn.Parameter(p.detach().float()) for p in a]
    ours = AdamW(groups(a), lr=1e-3)
    theirs = torch.optim.AdamW(groups(shadow), lr=1e-3, foreach=True)
    for step in range(4):
        grads(step, a)
        for p, s in zip(a, shadow):
            s.data.copy_(p.detach().float())
            s.grad = p.grad.float()
        ours.step()
        theirs.step()
        for p, s in zip(a, shadow):
            torch.testing.assert_close(p.float(), s.detach().to(torch.bfloat16).float(), rtol=8e-3, atol=1e-6)

"""The fused linear + cross-entropy and the multi-tensor AdamW, their own CUDA source run on the
CPU through the emulation harness (kernels/emulation), against the PyTorch references.

The linear-CE op runs whole: its Python (chunking, cuBLAS-side matmuls done by torch on the CPU,
torch.library registration, autograd) around the emulated `linear_cross_entropy.cu`.
The optimizer runs its own step() with the emulated `adamw.cu`, against torch.optim.AdamW.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from workbench.kernels import cupy_launch
from workbench.kernels import linear_cross_entropy as lce
from workbench.kernels.adamw import AdamW
from workbench.kernels.emulation import harness
from workbench.kernels.linear_cross_entropy import linear_cross_entropy_cupy as fused
from workbench.kernels.linear_cross_entropy import linear_cross_entropy_reference as reference

pytestmark = pytest.mark.skipif(harness.compiler_missing() is not None,
                                reason=harness.compiler_missing() or "")

N, C, V = 423, 213, 1000  # odd shapes, as Liger-Kernel tests
IGNORE = -1


@pytest.fixture
def backend():
    return harness.EmulationBackend()


@pytest.fixture
def emulated(backend, monkeypatch):
    """The op's CUDA kernel runs on CPU tensors; chunks of 100 tokens, so 5 chunks (the last ragged)."""
    monkeypatch.setattr(lce, "CHUNK_LOGITS", 100 * V)
    with cupy_launch.cpu_backend(backend):
        yield backend


def make_inputs(dtype, n=N, c=C, vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, c, generator=g) * 0.05).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::7] = IGNORE
    return h, w, t


def tolerances(dtype):
    # Both sides round the logits (and their gradient) to bf16 at the same points; the matmuls
    # accumulate in different orders.
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)


# --- the kernel alone ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 997])  # 16-byte accesses, and the one-element path
def test_chunk_kernel_loss_and_gradient(backend, dtype, vocab):
    g = torch.Generator().manual_seed(1)
    rows = 37
    x = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[::5] = IGNORE
    t[3] = vocab + 5  # out of range and not ignored: NaN loss
    scale = torch.rand(rows, generator=g) + 0.5
    loss = torch.empty(rows)
    grad = x.clone()
    lce.chunk_kernel(backend, grad, t, loss, scale, IGNORE, True)

    ok = torch.arange(rows) != 3
    xf = x.float().requires_grad_()
    ref = F.cross_entropy(xf, t.clamp(max=vocab - 1), ignore_index=IGNORE, reduction="none")
    (ref * scale).sum().backward()
    assert torch.isnan(loss[3])
    assert (loss[t == IGNORE] == 0).all() and (grad[t == IGNORE] == 0).all()
    torch.testing.assert_close(loss[ok], ref[ok].detach(), rtol=1e-5, atol=1e-5)
    expected = xf.grad.to(dtype).float()
    torch.testing.assert_close(grad[ok].float(), expected[ok], **(dict(rtol=1e-5, atol=1e-6)
                               if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)))

    # Loss only: the logits stay as they were.
    again = x.clone()
    lce.chunk_kernel(backend, again, t, loss, None, IGNORE, False)
    assert torch.equal(again, x)
    torch.testing.assert_close(loss[ok], ref[ok].detach(), rtol=1e-5, atol=1e-5)


def test_chunk_kernel_is_race_free():
    """Thread order inside a block (forward, reverse, random) never changes a bit of the output."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 1000, generator=g).to(torch.bfloat16)
    t = torch.randint(0, 1000, (9,), generator=g)
    t[4] = IGNORE

    def run(schedule):
        out, loss = x.clone(), torch.empty(9)
        lce.chunk_kernel(harness.EmulationBackend(schedule=schedule, seed=3), out, t, loss, None, IGNORE, True)
        return out, loss

    harness.run_schedules(run)


# --- the whole op: forward and backward ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_op_matches_reference(emulated, dtype):
    h, w, t = make_inputs(dtype)
    loss = fused(h, w, t, IGNORE)
    ref = reference(h, w, t, IGNORE)
    assert loss.dtype == torch.float32 and loss.shape == (N,)
    assert (loss[t == IGNORE] == 0).all()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)

    # mean over all tokens (uniform upstream gradient: the eager gradients, scaled)
    dh, dw = torch.autograd.grad(loss.mean(), (h, w))
    rh, rw = torch.autograd.grad(ref.mean(), (h, w))
    assert dh.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(dh, rh, **tolerances(dtype))
    torch.testing.assert_close(dw, rw, **tolerances(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_loss_gets_exact_gradients(emulated, dtype):
    """A per-token upstream gradient that differs between counted tokens (a weighted loss) cannot
    be rebuilt from the forward's unit dW: backward recomputes it, scaled row by row."""
    h, w, t = make_inputs(dtype, seed=4)
    weights = torch.linspace(0.0, 2.0, N)
    valid = (t != IGNORE).float()
    for reduce in (lambda x: (x * weights).sum(),                # non-uniform: recomputed
                   lambda x: (x * valid).sum() / valid.sum()):   # uniform over counted tokens
        dh, dw = torch.autograd.grad(reduce(fused(h, w, t, IGNORE)), (h, w))
        rh, rw = torch.autograd.grad(reduce(reference(h, w, t, IGNORE)), (h, w))
        torch.testing.assert_close(dh, rh, **tolerances(dtype))
        torch.testing.assert_close(dw, rw, **tolerances(dtype))


def test_gradient_only_where_needed(emulated):
    h, w, t = make_inputs(torch.float32)
    with torch.no_grad():  # eval: the loss only, no gradient work
        loss = fused(h, w, t, IGNORE)
    torch.testing.assert_close(loss, reference(h, w, t, IGNORE), rtol=1e-5, atol=1e-5)
    _, dh_unit, dw_unit = torch.ops.workbench.linear_cross_entropy_fwd(h.detach(), w.detach(), t, IGNORE,
                                                                       False, False)
    assert dh_unit.numel() == 0 and dw_unit.numel() == 0

    frozen = w.detach()  # a frozen output embedding: only dh
    (dh,) = torch.autograd.grad(fused(h, frozen, t, IGNORE).sum(), (h,))
    (rh,) = torch.autograd.grad(reference(h, frozen, t, IGNORE).sum(), (h,))
    torch.testing.assert_close(dh, rh, rtol=1e-4, atol=1e-5)


def test_non_contiguous_and_mixed_precision(emulated):
    """A strided h, and fp32 master weights under bf16 autocast (dW comes back in fp32)."""
    g = torch.Generator().manual_seed(5)
    strided = torch.randn(N, C + 11, generator=g)[:, 3:3 + C].requires_grad_()
    h = torch.randn(N, C, generator=g).requires_grad_()
    assert not strided.is_contiguous()
    w = (torch.randn(V, C, generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::9] = IGNORE
    loss = fused(strided, w, t, IGNORE)
    ref = reference(strided, w, t, IGNORE)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(loss.sum(), strided)[0],
                               torch.autograd.grad(ref.sum(), strided)[0], rtol=1e-4, atol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused(h, w, t, IGNORE)
        ref = reference(h, w, t, IGNORE)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    dh, dw = torch.autograd.grad(loss.mean(), (h, w))
    rh, rw = torch.autograd.grad(ref.mean(), (h, w))
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    torch.testing.assert_close(dh, rh, **tolerances(torch.bfloat16))
    torch.testing.assert_close(dw, rw, **tolerances(torch.bfloat16))


def test_works_under_torch_compile(emulated):
    """register_fake and register_autograd let torch.compile trace through the op (aot_eager:
    AOTAutograd with fake tensors, without inductor's C++ build)."""
    h, w, t = make_inputs(torch.float32, n=64, seed=6)
    compiled = torch.compile(lambda h, w: fused(h, w, t, IGNORE).mean(),
                             backend="aot_eager", fullgraph=True)
    loss = compiled(h, w)
    dh, dw = torch.autograd.grad(loss, (h, w))
    ref = reference(h, w, t, IGNORE).mean()
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw, rw, rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise_clear_errors(emulated):
    h, w, t = make_inputs(torch.float32, n=8)
    cases = [
        ((h[:, :5], w, t), "weight must be (vocab, 5)"),
        ((h, w, t[:4]), "targets must have shape (8,)"),
        ((h.half(), w, t), "h must be float32 or bfloat16"),
        ((h, w, t.float()), "targets must be int64"),
        ((h, w.to("meta"), t), "weight is on meta"),
        ((h[None], w, t), "h must be (tokens, C)"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            fused(*args)
    with cupy_launch.cpu_backend(None), pytest.raises(ValueError, match="run on CUDA tensors"):
        fused(h, w, t)


# --- AdamW ----------------------------------------------------------------------------------------

SHAPES = [(37, 13), (1000,), (5,), (3, 7, 11), (300,)]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES[:-1]]
    # a view 4 bytes into its storage: pointers not 16-byte aligned take the one-element path
    storage = torch.randn(301, generator=g).to(dtype)
    params.append(torch.nn.Parameter(storage[1:]))
    assert params[-1].data_ptr() % 16 != 0
    return params


def groups(params):
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]


def ours(params, backend):
    # chunks of 256 elements: several chunks per tensor and ragged ends; 64-thread blocks
    return AdamW(groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, backend=backend,
                 chunk_size=256, block=64)


def theirs(params):
    return torch.optim.AdamW(groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def set_grads(step, params, *others, skip=None):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        grad = None if i == skip else torch.randn(p.shape, generator=g).to(p.dtype)
        for ps in (params, *others):
            ps[i].grad = None if grad is None else grad.clone()


def set_lr(step, *optimizers):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 - step / 10)  # a schedule: the lr changes every step


def test_adamw_matches_torch_over_steps(backend):
    a = make_params()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = ours(a, backend), theirs(b)
    for step in range(6):
        set_grads(step, a, b, skip=1 if step in (2, 3) else None)  # param 1 misses two steps
        set_lr(step, opt_a, opt_b)
        opt_a.step()
        opt_b.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    for p, q in zip(a, b):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert set(sa) == set(sb) == {"step", "exp_avg", "exp_avg_sq"}
        assert sa["step"].dtype == torch.float32 and sa["step"].shape == () and sa["step"] == sb["step"]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    assert opt_a.state[a[1]]["step"] == 4


def test_adamw_bf16_params_keep_fp32_state(backend):
    """bf16 params, fp32 moments: each step is torch's fp32 AdamW from the bf16 value, rounded once."""
    a = make_params(torch.bfloat16)
    shadow = [torch.nn.Parameter(p.detach().float()) for p in a]
    opt_a, opt_s = ours(a, backend), theirs(shadow)
    for step in range(4):
        set_grads(step, a)
        for p, s in zip(a, shadow):
            s.data.copy_(p.detach().float())
            s.grad = p.grad.float()
        set_lr(step, opt_a, opt_s)
        opt_a.step()
        opt_s.step()
        for p, s in zip(a, shadow):
            assert p.dtype == torch.bfloat16
            torch.testing.assert_close(p.float(), s.detach().to(torch.bfloat16).float(), rtol=8e-3, atol=1e-6)
    for p, s in zip(a, shadow):
        assert opt_a.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(opt_a.state[p]["exp_avg"], opt_s.state[s]["exp_avg"], rtol=1e-6, atol=1e-7)

    # A checkpoint round trip keeps the fp32 moments bit for bit (torch would cast them to bf16).
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in a]
    reloaded = ours(fresh, backend)
    reloaded.load_state_dict(opt_a.state_dict())
    for p, q in zip(a, fresh):
        for key in ("exp_avg", "exp_avg_sq"):
            assert reloaded.state[q][key].dtype == torch.float32
            assert torch.equal(reloaded.state[q][key], opt_a.state[p][key])
        assert reloaded.state[q]["step"] == opt_a.state[p]["step"]


def test_adamw_checkpoints_move_both_ways(backend):
    """Our state dict loads into torch.optim.AdamW and theirs into ours; training goes on equal."""
    a = make_params(seed=7)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = ours(a, backend), theirs(b)
    for step in range(3):
        set_grads(step, a, b)
        opt_a.step()
        opt_b.step()
    # deep copies, as a checkpoint file gives: state_dict() hands out the live state tensors
    saved_a, saved_b = copy.deepcopy(opt_a.state_dict()), copy.deepcopy(opt_b.state_dict())
    assert set(saved_a["state"][0]) == set(saved_b["state"][0])

    # swap: torch continues from ours, ours from torch's
    b2 = [torch.nn.Parameter(p.detach().clone()) for p in a]
    a2 = [torch.nn.Parameter(q.detach().clone()) for q in b]
    torch_from_ours, ours_from_torch = theirs(b2), ours(a2, backend)
    torch_from_ours.load_state_dict(saved_a)
    ours_from_torch.load_state_dict(saved_b)
    for step in range(3, 5):
        set_grads(step, a, b, b2, a2)
        for opt in (opt_a, opt_b, torch_from_ours, ours_from_torch):
            opt.step()
    for p, q, p2, q2 in zip(a, b, b2, a2):
        torch.testing.assert_close(p2, p, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(q2, q, rtol=1e-6, atol=1e-6)


def test_adamw_refuses_what_it_cannot_do(backend):
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    opt = AdamW([{"params": [p], "amsgrad": True}], backend=backend)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()
    half = torch.nn.Parameter(torch.randn(10).half())
    half.grad = torch.randn(10).half()
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        AdamW([half], backend=backend).step()
    with pytest.raises(ValueError, match="run on CUDA tensors"):
        AdamW([p]).step()
    with pytest.raises(ValueError, match="invalid AdamW"):
        AdamW([p], lr=-1.0)


# --- both in the model's training step -----------------------------------------------------------

def test_tiny_gpt_trains_the_same_with_our_loss_and_optimizer(backend, torch_single_thread):
    """A tiny GPT (tied embeddings, so the loss's dW meets the embedding's gradient), four steps:
    our loss and AdamW (emulated) against the references, same losses and weights."""
    import dataclasses

    from workbench.engine.config import ModelConfig
    from workbench.engine.model import GPT
    from workbench.kernels import select
    from workbench.kernels.adamw import adamw_cupy
    from workbench.kernels.linear_cross_entropy import linear_cross_entropy_cupy

    reference_ops = select("torch", "cpu")
    our_ops = dataclasses.replace(reference_ops, name="lce+adamw",
                                  linear_cross_entropy=linear_cross_entropy_cupy, adamw=adamw_cupy)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=16, vocab_size=61)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 61, (2, 17), generator=g) for _ in range(4)]
    runs = []
    with cupy_launch.cpu_backend(backend):
        for ops in (reference_ops, our_ops):
            torch.manual_seed(0)
            model = GPT(cfg, ops)
            opt = ops.adamw(model.param_groups(0.1), 3e-3, (0.9, 0.95), 1e-8, fused=False)
            losses = []
            for batch in batches:
                targets = batch[:, 1:].clone()
                targets[0, :3] = IGNORE  # a masked prompt
                loss = model(batch[:, :-1], targets, IGNORE)
                mean = loss.sum() / (targets != IGNORE).sum()
                mean.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(mean.item())
            runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (ref_losses, ref_params), (our_losses, our_params) = runs
    assert isinstance(opt, AdamW)
    torch.testing.assert_close(our_losses, ref_losses, rtol=1e-5, atol=1e-5)
    for p, q in zip(our_params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)

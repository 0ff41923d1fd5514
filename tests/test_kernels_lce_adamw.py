"""The fused linear + cross-entropy and the multi-tensor AdamW against the PyTorch references, on
each backend (tests/kernel_cases.py).

The linear-CE op runs whole: its Python (chunking, the matmuls done by torch, torch.library
registration, autograd) around `linear_cross_entropy.cu`. The optimizer runs its own step() with
`adamw.cu`, against torch.optim.AdamW.
"""

from __future__ import annotations

import copy
import re

import kernel_cases
import pytest
import torch
import torch.nn.functional as F
from kernel_cases import ADAMW_CASES, DTYPES, IGNORE, LCE_CHUNK_VOCABS, LCE_SHAPES, TORCH_ADAMW, cupy_only, lce_close

from workbench.kernels import linear_cross_entropy as lce
from workbench.kernels.adamw import AdamW
from workbench.kernels.linear_cross_entropy import linear_cross_entropy_cupy as fused
from workbench.kernels.linear_cross_entropy import linear_cross_entropy_reference as reference

backend = kernel_cases.backend  # the fixture every test here takes: "emulated", and "cupy" under -m gpu

N, C, V = 423, 213, 1000  # odd shapes, as Liger-Kernel tests


@pytest.fixture
def chunks_of_100(monkeypatch):
    """Chunks of 100 tokens at vocab V: N tokens make 5 chunks, the last ragged."""
    monkeypatch.setattr(lce, "CHUNK_LOGITS", 100 * V)


def make_inputs(backend, dtype, n=N, c=C, vocab=V, seed=0):
    g = backend.generator(seed)
    h = torch.randn(n, c, generator=g, device=backend.device).to(dtype).requires_grad_()
    w = (torch.randn(vocab, c, generator=g, device=backend.device) * 0.05).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g, device=backend.device)
    t[::7] = IGNORE
    return h, w, t


def chunk_reference(x, t, scale=None):
    """F.cross_entropy's per-row loss and its gradient (scaled per row) in x's dtype."""
    xf = x.float().requires_grad_()
    loss = F.cross_entropy(xf, t.clamp(max=x.shape[1] - 1), ignore_index=IGNORE, reduction="none")
    (loss * (1 if scale is None else scale)).sum().backward()
    return loss.detach(), xf.grad.to(x.dtype).float()


# --- the kernel alone ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", LCE_CHUNK_VOCABS)
def test_chunk_kernel_loss_and_gradient(backend, dtype, vocab):
    g = backend.generator(1)
    rows = 37
    x = (torch.randn(rows, vocab, generator=g, device=backend.device) * 4).to(dtype)
    t = torch.randint(0, vocab, (rows,), generator=g, device=backend.device)
    t[::5] = IGNORE
    t[3] = vocab + 5  # out of range and not ignored: NaN loss
    scale = torch.rand(rows, generator=g, device=backend.device) + 0.5
    loss = torch.empty(rows, device=backend.device)
    grad = x.clone()
    lce.chunk_kernel(backend.launcher, grad, t, loss, scale, IGNORE, True)

    ok = torch.arange(rows, device=backend.device) != 3
    ref, ref_grad = chunk_reference(x, t, scale)
    assert torch.isnan(loss[3])
    assert (loss[t == IGNORE] == 0).all() and (grad[t == IGNORE] == 0).all()
    torch.testing.assert_close(loss[ok], ref[ok], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[ok].float(), ref_grad[ok], **(dict(rtol=1e-5, atol=1e-6)
                               if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)))

    # Loss only: the logits stay as they were.
    again = x.clone()
    lce.chunk_kernel(backend.launcher, again, t, loss, None, IGNORE, False)
    assert torch.equal(again, x)
    torch.testing.assert_close(loss[ok], ref[ok], rtol=1e-5, atol=1e-5)


def test_chunk_kernel_is_race_free(backend):
    """Thread order inside a block (forward, reverse, random) never changes a bit of the output."""
    g = backend.generator(2)
    x = torch.randn(9, 1000, generator=g, device=backend.device).to(torch.bfloat16)
    t = torch.randint(0, 1000, (9,), generator=g, device=backend.device)
    t[4] = IGNORE

    def run():
        out, loss = x.clone(), torch.empty(9, device=backend.device)
        lce.chunk_kernel(backend.launcher, out, t, loss, None, IGNORE, True)
        return out, loss

    grad, loss = backend.run_schedules(run)
    ref, ref_grad = chunk_reference(x, t)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=8e-3, atol=1e-5)


# --- the whole op: forward and backward ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LCE_SHAPES)
def test_fused_op_matches_reference(backend, monkeypatch, dtype, shape):
    """Forward, then from that one forward the gradients of a mean (a uniform upstream gradient:
    the forward's unit gradients, scaled), a mean over the counted tokens, and a weighted sum
    (non-uniform: backward recomputes dW, scaled row by row)."""
    n, c, vocab, chunk_tokens = shape
    if chunk_tokens:
        monkeypatch.setattr(lce, "CHUNK_LOGITS", chunk_tokens * vocab)
    h, w, t = make_inputs(backend, dtype, n, c, vocab)
    loss = fused(h, w, t, IGNORE)
    ref = reference(h, w, t, IGNORE)
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    assert (loss[t == IGNORE] == 0).all()
    lce_close(backend, "loss", loss, ref, dtype)

    weights = torch.linspace(0.0, 2.0, n, device=backend.device)
    valid = (t != IGNORE).float()
    for what, reduce in (("mean", lambda x: x.mean()),
                         ("mean over counted tokens", lambda x: (x * valid).sum() / valid.sum()),
                         ("weighted", lambda x: (x * weights).sum())):
        dh, dw = torch.autograd.grad(reduce(loss), (h, w), retain_graph=True)
        rh, rw = torch.autograd.grad(reduce(ref), (h, w), retain_graph=True)
        assert dh.dtype == dtype and dw.dtype == dtype
        lce_close(backend, "grad", dh, rh, dtype, f"dh ({what})")
        lce_close(backend, "grad", dw, rw, dtype, f"dW ({what})")


def test_gradient_only_where_needed(backend, chunks_of_100):
    h, w, t = make_inputs(backend, torch.float32)
    with torch.no_grad():  # eval: the loss only, no gradient work
        loss = fused(h, w, t, IGNORE)
    lce_close(backend, "loss", loss, reference(h, w, t, IGNORE), torch.float32)
    _, dh_unit, dw_unit = torch.ops.workbench.linear_cross_entropy_fwd(h.detach(), w.detach(), t, IGNORE,
                                                                       False, False)
    assert dh_unit.numel() == 0 and dw_unit.numel() == 0

    frozen = w.detach()  # a frozen output embedding: only dh
    (dh,) = torch.autograd.grad(fused(h, frozen, t, IGNORE).sum(), (h,))
    (rh,) = torch.autograd.grad(reference(h, frozen, t, IGNORE).sum(), (h,))
    lce_close(backend, "grad", dh, rh, torch.float32)


def test_non_contiguous_and_mixed_precision(backend, chunks_of_100):
    """A strided h, and fp32 master weights under bf16 autocast (dW comes back in fp32)."""
    g = backend.generator(5)
    strided = torch.randn(N, C + 11, generator=g, device=backend.device)[:, 3:3 + C].requires_grad_()
    h = torch.randn(N, C, generator=g, device=backend.device).requires_grad_()
    assert not strided.is_contiguous()
    w = (torch.randn(V, C, generator=g, device=backend.device) * 0.05).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g, device=backend.device)
    t[::9] = IGNORE
    loss = fused(strided, w, t, IGNORE)
    ref = reference(strided, w, t, IGNORE)
    lce_close(backend, "loss", loss, ref, torch.float32)
    lce_close(backend, "grad", torch.autograd.grad(loss.sum(), strided)[0],
              torch.autograd.grad(ref.sum(), strided)[0], torch.float32)

    with torch.autocast(backend.device.type, dtype=torch.bfloat16):
        loss = fused(h, w, t, IGNORE)
        ref = reference(h, w, t, IGNORE)
    lce_close(backend, "loss", loss, ref, torch.bfloat16, "autocast")
    dh, dw = torch.autograd.grad(loss.mean(), (h, w))
    rh, rw = torch.autograd.grad(ref.mean(), (h, w))
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    lce_close(backend, "grad", dh, rh, torch.bfloat16, "dh (autocast)")
    lce_close(backend, "grad", dw, rw, torch.bfloat16, "dW (autocast)")


def test_works_under_torch_compile(backend):
    """register_fake and register_autograd let torch.compile trace through the op (on the
    emulation aot_eager: AOTAutograd with fake tensors, without inductor's C++ build)."""
    torch._dynamo.reset()
    h, w, t = make_inputs(backend, torch.float32, n=64, seed=6)
    compiled = torch.compile(lambda h, w: fused(h, w, t, IGNORE).mean(), backend=backend.compiler, fullgraph=True)
    loss = compiled(h, w)
    dh, dw = torch.autograd.grad(loss, (h, w))
    ref = reference(h, w, t, IGNORE).mean()
    rh, rw = torch.autograd.grad(ref, (h, w))
    lce_close(backend, "loss", loss, ref, torch.float32)
    lce_close(backend, "grad", dh, rh, torch.float32, "dh")
    lce_close(backend, "grad", dw, rw, torch.float32, "dW")


def test_bad_inputs_raise_clear_errors(backend):
    h, w, t = make_inputs(backend, torch.float32, n=8)
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


@cupy_only
def test_linear_cross_entropy_peak_memory_is_a_quarter_of_unfused(backend):
    """GPT-2-small shapes: B*T = 8192, C = 768, V = 32768, bf16."""
    h, w, t = make_inputs(backend, torch.bfloat16, 8192, 768, 32768, seed=2)

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

def make_params(backend, shapes, dtype=torch.float32, seed=0):
    g = backend.generator(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device=backend.device).to(dtype)) for s in shapes[:-1]]
    # the last a view 4 bytes into its storage: pointers not 16-byte aligned take the one-element path
    storage = torch.randn(shapes[-1][0] + 1, generator=g, device=backend.device).to(dtype)
    params.append(torch.nn.Parameter(storage[1:]))
    assert params[-1].data_ptr() % 16 != 0
    return params


def clones(params, dtype=None):
    return [torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True)) for p in params]


def groups(params):
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]


def ours(params, backend, chunking):
    return AdamW(groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, backend=backend.launcher, **chunking)


def theirs(params, kind):
    return torch.optim.AdamW(groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kind)


def set_grads(step, params, *others, skip=None):
    g = torch.Generator(device=params[0].device).manual_seed(100 + step)
    for i, p in enumerate(params):
        grad = None if i == skip else torch.randn(p.shape, generator=g, device=p.device).to(p.dtype)
        for ps in (params, *others):
            ps[i].grad = None if grad is None else grad.clone()


def set_lr(step, *optimizers):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 - step / 10)  # a schedule: the lr changes every step


@pytest.mark.parametrize("shapes, chunking", ADAMW_CASES)
@pytest.mark.parametrize("kind, rtol", TORCH_ADAMW)
def test_adamw_matches_torch_over_steps(backend, shapes, chunking, kind, rtol):
    a = make_params(backend, shapes)
    b = clones(a)
    opt_a, opt_b = ours(a, backend, chunking), theirs(b, kind)
    for step in range(6):
        set_grads(step, a, b, skip=1 if step in (2, 3) else None)  # param 1 misses two steps
        set_lr(step, opt_a, opt_b)
        opt_a.step()
        opt_b.step()
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(p, q, rtol=rtol, atol=1e-6)
    for p, q in zip(a, b, strict=True):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert set(sa) == set(sb) == {"step", "exp_avg", "exp_avg_sq"}
        assert sa["step"].dtype == torch.float32 and sa["step"].shape == () and sa["step"].device.type == "cpu"
        assert float(sa["step"]) == float(sb["step"])
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=rtol, atol=1e-7)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=rtol, atol=1e-9)
    assert opt_a.state[a[1]]["step"] == 4


@pytest.mark.parametrize("shapes, chunking", ADAMW_CASES)
@pytest.mark.parametrize("kind, rtol", TORCH_ADAMW)
def test_adamw_bf16_params_keep_fp32_state(backend, shapes, chunking, kind, rtol):
    """bf16 params, fp32 moments: each step is torch's fp32 AdamW from the bf16 value, rounded once."""
    a = make_params(backend, shapes, torch.bfloat16)
    shadow = clones(a, torch.float32)
    opt_a, opt_s = ours(a, backend, chunking), theirs(shadow, kind)
    for step in range(4):
        set_grads(step, a)
        for p, s in zip(a, shadow, strict=True):
            s.data.copy_(p.detach().float())
            s.grad = p.grad.float()
        set_lr(step, opt_a, opt_s)
        opt_a.step()
        opt_s.step()
        for p, s in zip(a, shadow, strict=True):
            assert p.dtype == torch.bfloat16
            torch.testing.assert_close(p.float(), s.detach().to(torch.bfloat16).float(), rtol=8e-3, atol=1e-6)
    for p, s in zip(a, shadow, strict=True):
        assert opt_a.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(opt_a.state[p]["exp_avg"], opt_s.state[s]["exp_avg"], rtol=rtol, atol=1e-7)

    # A checkpoint round trip keeps the fp32 moments bit for bit (torch would cast them to bf16).
    fresh = clones(a)
    reloaded = ours(fresh, backend, chunking)
    reloaded.load_state_dict(opt_a.state_dict())
    for p, q in zip(a, fresh, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert reloaded.state[q][key].dtype == torch.float32
            assert torch.equal(reloaded.state[q][key], opt_a.state[p][key])
        assert reloaded.state[q]["step"] == opt_a.state[p]["step"]


@pytest.mark.parametrize("kind, rtol", TORCH_ADAMW)
def test_adamw_checkpoints_move_both_ways(backend, kind, rtol):
    """Our state dict loads into torch.optim.AdamW and theirs into ours; training goes on equal."""
    shapes, chunking = ADAMW_CASES[0].values
    a = make_params(backend, shapes, seed=7)
    b = clones(a)
    opt_a, opt_b = ours(a, backend, chunking), theirs(b, kind)
    for step in range(3):
        set_grads(step, a, b)
        opt_a.step()
        opt_b.step()
    # deep copies, as a checkpoint file gives: state_dict() hands out the live state tensors
    saved_a, saved_b = copy.deepcopy(opt_a.state_dict()), copy.deepcopy(opt_b.state_dict())
    assert set(saved_a["state"][0]) == set(saved_b["state"][0])

    # swap: torch continues from ours, ours from torch's
    b2, a2 = clones(a), clones(b)
    torch_from_ours, ours_from_torch = theirs(b2, kind), ours(a2, backend, chunking)
    torch_from_ours.load_state_dict(saved_a)
    ours_from_torch.load_state_dict(saved_b)
    # wherever torch kept them (its fused step lives on the GPU), ours are fp32 moments and a CPU step
    assert all(s["step"].device.type == "cpu" and s["exp_avg"].dtype == torch.float32
               for s in ours_from_torch.state.values())
    for step in range(3, 5):
        set_grads(step, a, b, b2, a2)
        for opt in (opt_a, opt_b, torch_from_ours, ours_from_torch):
            opt.step()
    for p, q, p2, q2 in zip(a, b, b2, a2, strict=True):
        torch.testing.assert_close(p2, p, rtol=rtol, atol=1e-6)
        torch.testing.assert_close(q2, q, rtol=rtol, atol=1e-6)


def test_adamw_refuses_what_it_cannot_do(backend):
    p = torch.nn.Parameter(backend.randn(10, seed=0))
    p.grad = backend.randn(10, seed=1)
    opt = AdamW([{"params": [p], "amsgrad": True}], backend=backend.launcher)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()
    half = torch.nn.Parameter(backend.randn(10, seed=2).half())
    half.grad = backend.randn(10, seed=3).half()
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        AdamW([half], backend=backend.launcher).step()
    with pytest.raises(ValueError, match="invalid AdamW"):
        AdamW([p], lr=-1.0)


# --- both in the model's training step -----------------------------------------------------------

def test_tiny_gpt_trains_the_same_with_our_loss_and_optimizer(backend, torch_single_thread):
    """A tiny GPT (tied embeddings, so the loss's dW meets the embedding's gradient), four steps:
    our loss and AdamW against the references, same losses and weights."""
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
    g = backend.generator(0)
    batches = [torch.randint(0, 61, (2, 17), generator=g, device=backend.device) for _ in range(4)]
    runs = []
    for ops in (reference_ops, our_ops):
        torch.manual_seed(0)
        model = GPT(cfg, ops).to(backend.device)
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
    assert {"lce_chunk_f32", "adamw_f32"} <= set(backend.launches)
    torch.testing.assert_close(our_losses, ref_losses, rtol=1e-5, atol=1e-5)
    for p, q in zip(our_params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)

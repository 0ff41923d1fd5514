"""RMSNorm, RoPE and SwiGLU against the PyTorch references, on each backend (tests/kernel_cases.py).

The ops' real wrappers (kernels/rmsnorm.py, rope.py, swiglu.py: input checks, dtype dispatch,
vector or scalar path, grid sizes, the torch.library custom ops and their autograd) run
unchanged on the emulation and on CuPy. Forward and backward are compared with autograd through
the reference, in float32 and bfloat16, on odd shapes (Liger-Kernel's 3x423x213 among them); on
the emulation the kernels must also give bitwise identical results under different thread and
block schedules (no races).
"""

from __future__ import annotations

import math

import kernel_cases
import pytest
import torch
from kernel_cases import DTYPES, RMSNORM_SHAPES, ROPE_SHAPES, SWIGLU_SHAPES, assert_close, cupy_only, grads, shape_id

from workbench.kernels.rmsnorm import add_rms_norm_cupy, add_rms_norm_op, add_rms_norm_reference
from workbench.kernels.rope import rope_cupy, rope_frequencies, rope_reference, rope_rotate_op
from workbench.kernels.swiglu import swiglu_cupy, swiglu_op, swiglu_reference

backend = kernel_cases.backend  # the fixture every test here takes: "emulated", and "cupy" under -m gpu


def vector_width(dtype) -> int:
    return 4 if dtype == torch.float32 else 8  # elements per 16-byte access


# ---------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RMSNORM_SHAPES, ids=shape_id)
@pytest.mark.parametrize("with_delta", [True, False], ids=["delta", "no-delta"])
def test_add_rms_norm_matches_reference(backend, dtype, shape, with_delta):
    x = backend.leaf(*shape, dtype=dtype, seed=0)
    delta = backend.leaf(*shape, dtype=dtype, seed=1) if with_delta else None
    w = backend.leaf(shape[-1], dtype=torch.float32, seed=2, scale=0.5)
    w.data += 1.0
    h, y = add_rms_norm_cupy(x, delta, w, 1e-5)
    ours = grads([h, y] if with_delta else [y], [x, delta, w])
    h_ref, y_ref = add_rms_norm_reference(x, delta, w, 1e-5)
    ref = grads([h_ref, y_ref] if with_delta else [y_ref], [x, delta, w])
    assert (h is x) == (not with_delta)
    assert h.dtype == y.dtype == dtype
    assert torch.equal(h, h_ref)
    assert_close(y, y_ref, dtype, what="y")
    for name, a, b in zip(("dx", "ddelta"), ours[:2], ref[:2], strict=True):
        if b is not None:
            assert_close(a, b, dtype, what=name)
    rows = math.prod(shape[:-1])
    assert_close(ours[2], ref[2], torch.float32, scale=10 * rows ** 0.5, what="dweight")  # a sum over rows
    # rows whose length is a multiple of the vector width take the 16-byte path (fresh tensors are aligned)
    path = f"_v{vector_width(dtype)}" if shape[-1] % vector_width(dtype) == 0 else "_v1"
    fwd, bwd = [n for n in backend.launches if "fwd" in n], [n for n in backend.launches if "bwd" in n]
    assert fwd[0].endswith(path) and bwd[0].endswith(path), backend.launches
    assert backend.launches[-1] == "rmsnorm_dw_reduce"


def test_add_rms_norm_mixed_dtypes_strided_input_and_bf16_weight(backend):
    # float32 residual stream + bf16 delta (autocast), x a column slice of a wider buffer
    wide = backend.leaf(6, 50, 160, dtype=torch.float32, seed=3)
    x = wide[..., :128]
    delta = backend.leaf(6, 50, 128, dtype=torch.bfloat16, seed=4)
    w = backend.leaf(128, dtype=torch.bfloat16, seed=5)
    h, y = add_rms_norm_cupy(x, delta, w, 1e-6)
    ours = grads([h, y], [wide, delta, w])
    h_ref, y_ref = add_rms_norm_reference(x, delta, w, 1e-6)
    ref = grads([h_ref, y_ref], [wide, delta, w])
    assert backend.launches[0] == "add_rmsnorm_fwd_f32_bf16_v4"  # the strided view was used as is
    assert h.dtype == torch.float32 and y.dtype == torch.float32
    assert torch.equal(h, h_ref)
    assert_close(y, y_ref, torch.float32)
    assert_close(ours[0], ref[0], torch.float32)
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.bfloat16
    assert_close(ours[1], ref[1], torch.bfloat16)
    assert_close(ours[2], ref[2], torch.bfloat16, scale=10)


def test_add_rms_norm_has_no_races(backend):
    x = backend.leaf(2, 45, 264, dtype=torch.bfloat16, seed=6)
    delta = backend.leaf(2, 45, 264, dtype=torch.bfloat16, seed=7)
    w = backend.leaf(264, dtype=torch.float32, seed=8)

    def run():
        h, y = add_rms_norm_cupy(x, delta, w, 1e-5)
        return (h, y, *grads([h, y], [x, delta, w]))

    h, y, *ours = backend.run_schedules(run)
    h_ref, y_ref = add_rms_norm_reference(x, delta, w, 1e-5)
    ref = grads([h_ref, y_ref], [x, delta, w])
    assert torch.equal(h, h_ref)
    assert_close(y, y_ref, torch.bfloat16)
    assert_close(ours[0], ref[0], torch.bfloat16)
    assert_close(ours[1], ref[1], torch.bfloat16)
    assert_close(ours[2], ref[2], torch.float32, scale=10 * 90 ** 0.5)


def test_add_rms_norm_bad_inputs_are_clear_errors(backend):
    x = backend.randn(4, 8, seed=0)
    w = torch.ones(8, device=backend.device)
    with pytest.raises(ValueError, match="x must be float32 or bfloat16, got float16"):
        add_rms_norm_cupy(x.half(), None, w, 1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(7,\)"):
        add_rms_norm_cupy(x, None, torch.ones(7, device=backend.device), 1e-5)
    with pytest.raises(ValueError, match=r"delta must have shape \(4, 8\)"):
        add_rms_norm_cupy(x, backend.randn(4, 9, seed=1), w, 1e-5)
    with pytest.raises(ValueError, match="weight is on meta"):
        add_rms_norm_cupy(x, None, w.to("meta"), 1e-5)


# ---------------------------------------------------------------- RoPE
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, Hk, D", ROPE_SHAPES, ids=shape_id)
def test_rope_matches_reference(backend, dtype, B, T, H, Hk, D):
    q = backend.leaf(B, T, H, D, dtype=dtype, seed=0)
    k = backend.leaf(B, T, Hk, D, dtype=dtype, seed=1)
    cos, sin = rope_frequencies(T, D, 10000.0, device=backend.device)
    qo, ko = rope_cupy(q, k, cos, sin)
    ours = grads([qo, ko], [q, k])
    qr, kr = rope_reference(q, k, cos, sin)
    ref = grads([qr, kr], [q, k])
    for a, b in zip((qo, ko, *ours), (qr, kr, *ref), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, dtype)
    scalar = (D // 2) % vector_width(dtype) != 0  # pairs per head not a whole number of vectors
    assert all(n.endswith("_v1") == scalar for n in backend.launches), backend.launches


def test_rope_on_views_of_a_fused_qkv_projection_has_no_races(backend):
    B, T, H, Hk, D = 2, 13, 4, 2, 32
    qkv = backend.leaf(B, T, (H + 2 * Hk) * D, dtype=torch.bfloat16, seed=2)
    q = qkv[..., :H * D].view(B, T, H, D)
    k = qkv[..., H * D:(H + Hk) * D].view(B, T, Hk, D)
    assert not q.is_contiguous()
    cos, sin = rope_frequencies(T, D, 500.0, device=backend.device)

    def run():
        qo, ko = rope_cupy(q, k, cos, sin)
        return (qo, ko, *grads([qo, ko], [qkv]))

    qo, ko, dqkv = backend.run_schedules(run)
    qr, kr = rope_reference(q, k, cos, sin)
    assert_close(qo, qr, torch.bfloat16)
    assert_close(ko, kr, torch.bfloat16)
    assert_close(dqkv, grads([qr, kr], [qkv])[0], torch.bfloat16)


def test_rope_bad_inputs_are_clear_errors(backend):
    q, k = backend.randn(1, 4, 2, 8, seed=0), backend.randn(1, 4, 2, 8, seed=1)
    cos, sin = rope_frequencies(4, 8, 10000.0, device=backend.device)
    with pytest.raises(ValueError, match=r"cos must have shape \(4, 4\)"):
        rope_cupy(q, k, cos[:3], sin)
    with pytest.raises(ValueError, match="q must be"):
        rope_cupy(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="k must be bfloat16"):
        rope_cupy(q.bfloat16(), k, cos, sin)
    with pytest.raises(ValueError, match="head dimension must be even"):
        rope_cupy(backend.randn(1, 4, 2, 7, seed=2), backend.randn(1, 4, 2, 7, seed=3), cos, sin)


# ---------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=shape_id)
def test_swiglu_matches_reference(backend, dtype, shape):
    gate = backend.leaf(*shape, dtype=dtype, seed=0, scale=3.0)
    up = backend.leaf(*shape, dtype=dtype, seed=1)
    out = swiglu_cupy(gate, up)
    ours = grads([out], [gate, up])
    out_ref = swiglu_reference(gate, up)
    ref = grads([out_ref], [gate, up])
    assert out.dtype == dtype
    for a, b in zip((out, *ours), (out_ref, *ref), strict=True):
        assert_close(a, b, dtype)


def test_swiglu_on_halves_of_a_fused_projection_has_no_races(backend):
    fused = backend.leaf(3, 11, 2 * 96, dtype=torch.float32, seed=4, scale=2.0)
    gate, up = fused.chunk(2, dim=-1)

    def run():
        out = swiglu_cupy(gate, up)
        return (out, *grads([out], [fused]))

    out, dfused = backend.run_schedules(run)
    assert set(backend.launches) == {"swiglu_fwd_f32_v4", "swiglu_bwd_f32_v4"}  # the halves used as they are
    out_ref = swiglu_reference(gate, up)
    assert_close(out, out_ref, torch.float32)
    assert_close(dfused, grads([out_ref], [fused])[0], torch.float32)


def test_swiglu_bad_inputs_are_clear_errors(backend):
    x = backend.randn(4, seed=0)
    with pytest.raises(ValueError, match="up is on meta"):
        swiglu_cupy(x, x.to("meta"))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        swiglu_cupy(x.half(), x.half())


def test_misaligned_inputs_take_the_scalar_path(backend):
    # a tensor starting 2 bytes into its storage: 16-byte vector loads would fault on a GPU
    storage = backend.leaf(1 + 4 * 256, dtype=torch.bfloat16, seed=9)
    gate = storage[1:].view(4, 256)
    up = backend.leaf(4, 256, dtype=torch.bfloat16, seed=10)
    out = swiglu_cupy(gate, up)
    ours = grads([out], [storage, up])
    assert backend.launches == ["swiglu_fwd_bf16_v1", "swiglu_bwd_bf16_v1"]
    out_ref = swiglu_reference(gate, up)
    assert_close(out, out_ref, torch.bfloat16)
    for a, b in zip(ours, grads([out_ref], [storage, up]), strict=True):
        assert_close(a, b, torch.bfloat16)


# ---------------------------------------------------------------- registration: opcheck, compile
def test_custom_ops_pass_opcheck(backend):
    # schema, fake (meta) kernels, autograd registration and AOT dispatch, as torch.compile needs them
    f32 = torch.float32
    x, d = backend.leaf(3, 5, 64, dtype=f32, seed=0), backend.leaf(3, 5, 64, dtype=f32, seed=1)
    w = backend.leaf(64, dtype=f32, seed=2)
    q, k = backend.leaf(2, 3, 2, 16, dtype=f32, seed=3), backend.leaf(2, 3, 1, 16, dtype=f32, seed=4)
    cos, sin = rope_frequencies(3, 16, 10000.0, device=backend.device)
    g, u = backend.leaf(4, 40, dtype=f32, seed=5), backend.leaf(4, 40, dtype=f32, seed=6)
    torch.library.opcheck(add_rms_norm_op, (x, d, w, 1e-5))
    torch.library.opcheck(add_rms_norm_op, (x, None, w, 1e-5))
    torch.library.opcheck(rope_rotate_op, (q, k, cos, sin, 1.0))
    torch.library.opcheck(swiglu_op, (g, u))


def block(add_rms_norm, rope, swiglu, cos, sin, x, delta, w, q, k):
    """A transformer block's worth of the three ops, reduced to a scalar loss."""
    h, y = add_rms_norm(x, delta, w, 1e-5)
    qo, ko = rope(q, k, cos, sin)
    gate, up = y.chunk(2, dim=-1)
    ko = ko.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # grouped-query heads
    return swiglu(gate, up).float().sum() + h.float().square().mean() + (qo.float() * ko.float()).sum()


def test_ops_under_torch_compile(backend):
    torch._dynamo.reset()
    f32 = torch.float32
    x, delta = backend.leaf(2, 6, 32, dtype=f32, seed=0), backend.leaf(2, 6, 32, dtype=f32, seed=1)
    w = backend.leaf(32, dtype=f32, seed=2)
    q, k = backend.leaf(2, 6, 2, 16, dtype=f32, seed=3), backend.leaf(2, 6, 2, 16, dtype=f32, seed=4)
    cos, sin = rope_frequencies(6, 16, 10000.0, device=backend.device)
    inputs = (x, delta, w, q, k)
    # the emulation compiles with aot_eager: the graph traced with the fake kernels and autograd
    # formulas, then run; CUDA with inductor
    compiled = torch.compile(block, backend=backend.compiler, fullgraph=True)
    loss = compiled(add_rms_norm_cupy, rope_cupy, swiglu_cupy, cos, sin, *inputs)
    ours = torch.autograd.grad(loss, inputs)
    loss_ref = block(add_rms_norm_reference, rope_reference, swiglu_reference, cos, sin, *inputs)
    ref = torch.autograd.grad(loss_ref, inputs)
    torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-5)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@cupy_only
def test_ops_on_a_side_stream_under_inductor_in_bf16(backend):
    torch._dynamo.reset()
    bf16 = torch.bfloat16
    x, delta = backend.leaf(4, 64, 256, dtype=bf16, seed=0), backend.leaf(4, 64, 256, dtype=bf16, seed=1)
    w = backend.leaf(256, dtype=torch.float32, seed=2)
    q, k = backend.leaf(4, 64, 4, 32, dtype=bf16, seed=3), backend.leaf(4, 64, 2, 32, dtype=bf16, seed=4)
    cos, sin = rope_frequencies(64, 32, 10000.0, device=backend.device)
    inputs = (x, delta, w, q, k)
    compiled = torch.compile(block, fullgraph=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the kernels must run on PyTorch's current stream
        loss = compiled(add_rms_norm_cupy, rope_cupy, swiglu_cupy, cos, sin, *inputs)
        ours = torch.autograd.grad(loss, inputs)
    torch.cuda.current_stream().wait_stream(side)
    loss_ref = block(add_rms_norm_reference, rope_reference, swiglu_reference, cos, sin, *inputs)
    ref = torch.autograd.grad(loss_ref, inputs)
    torch.testing.assert_close(loss, loss_ref, atol=1e-1, rtol=2e-2)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, torch.bfloat16, scale=5)


# ---------------------------------------------------------------- in the engine's model
def test_tiny_gpt_with_our_kernels_matches_the_reference_model(backend):
    # the engine's real model (grouped-query attention, fused qkv and gate/up projections) with
    # our RMSNorm, RoPE and SwiGLU kernels against the same model on the reference ops
    from workbench.engine.config import ModelConfig
    from workbench.engine.model import GPT
    from workbench.kernels import Ops, reference_ops

    ref_ops = reference_ops("test")
    ours = Ops("cupy", "test", add_rms_norm_cupy, rope_cupy, swiglu_cupy,
               ref_ops.linear_cross_entropy, ref_ops.adamw)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, seq_len=16, vocab_size=50)
    torch.manual_seed(0)
    model_ref = GPT(cfg, ref_ops).to(backend.device)
    model = GPT(cfg, ours).to(backend.device)
    model.load_state_dict(model_ref.state_dict())
    idx = torch.randint(0, 50, (2, 16), generator=backend.generator(1), device=backend.device)
    targets = idx.roll(-1, dims=1)
    loss = model(idx, targets).mean()
    loss.backward()
    loss_ref = model_ref(idx, targets).mean()
    loss_ref.backward()
    assert {n.split("_")[0] for n in backend.launches} >= {"add", "rope", "swiglu", "rmsnorm"}
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for (name, p), p_ref in zip(model.named_parameters(), model_ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


@cupy_only
def test_gpt_step_under_bf16_autocast_matches_the_reference_ops(backend):
    # float32 residual stream + bf16 sub-layer outputs: the mixed-dtype RMSNorm path
    from workbench.engine.config import ModelConfig
    from workbench.engine.model import GPT
    from workbench.kernels import select

    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=128, seq_len=64, vocab_size=300)
    torch.manual_seed(0)
    model_ref = GPT(cfg, select("torch", "cuda")).cuda()
    model = GPT(cfg, select("cupy", "cuda")).cuda()
    model.load_state_dict(model_ref.state_dict())
    idx = torch.randint(0, 300, (4, 64), device="cuda")
    targets = idx.roll(-1, dims=1)
    losses = []
    for m in (model, model_ref):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(idx, targets).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=2e-2, rtol=1e-2)
    for (name, p), p_ref in zip(model.named_parameters(), model_ref.parameters(), strict=True):
        scale = p_ref.grad.abs().max().item() + 1e-6
        assert (p.grad - p_ref.grad).abs().max().item() <= 5e-2 * scale, name

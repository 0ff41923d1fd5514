"""RMSNorm, RoPE and SwiGLU: each kernel's own CUDA source, run on the CPU, against the reference.

The ops' real wrappers (kernels/rmsnorm.py, rope.py, swiglu.py: input checks, dtype dispatch,
vector or scalar path, grid sizes, the torch.library custom ops and their autograd) run
unchanged; only the launches go to the emulation harness instead of CuPy. Forward and backward
are compared with autograd through the PyTorch reference, in float32 and bfloat16, on odd
shapes (Liger-Kernel's 3x423x213 among them), and the kernels must give bitwise identical
results under different thread and block schedules (no races).
"""

from __future__ import annotations

import pytest
import torch

from workbench.kernels.cupy_launch import cpu_backend
from workbench.kernels.emulation import harness
from workbench.kernels.emulation.harness import EmulationBackend
from workbench.kernels.rmsnorm import add_rms_norm_cupy, add_rms_norm_op, add_rms_norm_reference
from workbench.kernels.rope import rope_cupy, rope_frequencies, rope_reference, rope_rotate_op
from workbench.kernels.swiglu import swiglu_cupy, swiglu_op, swiglu_reference

pytestmark = pytest.mark.skipif(harness.compiler_missing() is not None,
                                reason=harness.compiler_missing() or "")

# (atol, rtol) per dtype, as Liger-Kernel's tests do: float32 differs from the reference by
# summation order only; bfloat16 by one rounding of the output (our kernels round once where
# the reference's autograd rounds twice, e.g. the residual's gradient)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def assert_close(actual, expected, dtype, scale=1.0, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol, msg=what or None)


def emulated(schedule="forward", seed=0):
    backend = EmulationBackend(schedule=schedule, seed=seed)
    return backend, cpu_backend(backend)


def grads(outputs, inputs, seed=1):
    """Gradients of sum(output * a fixed random weight) with respect to inputs (None where unused)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    live = [i for i in inputs if i is not None]
    g = iter(torch.autograd.grad(loss, live))
    return [next(g) if i is not None else None for i in inputs]


def leaf(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype).requires_grad_()


# ---------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, path", [((3, 423, 213), "v1"), ((2, 37, 256), "v"), ((3, 1032), "v"),
                                         ((5, 1), "v1")])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_reference(dtype, shape, path, with_delta):
    x = leaf(*shape, dtype=dtype, seed=0)
    delta = leaf(*shape, dtype=dtype, seed=1) if with_delta else None
    w = leaf(shape[-1], dtype=torch.float32, seed=2, scale=0.5)
    w.data += 1.0
    backend, ctx = emulated()
    with ctx:
        h, y = add_rms_norm_cupy(x, delta, w, 1e-5)
        ours = grads([h, y] if with_delta else [y], [x, delta, w])
    h_ref, y_ref = add_rms_norm_reference(x, delta, w, 1e-5)
    ref = grads([h_ref, y_ref] if with_delta else [y_ref], [x, delta, w])
    assert (h is x) == (not with_delta)
    assert h.dtype == y.dtype == dtype
    assert torch.equal(h, h_ref)
    assert_close(y, y_ref, dtype, what="y")
    for name, a, b in zip(("dx", "ddelta"), ours[:2], ref[:2]):
        if b is not None:
            assert_close(a, b, dtype, what=name)
    assert_close(ours[2], ref[2], torch.float32, scale=shape[0] * 10, what="dweight")  # sum over rows
    fwd, bwd = [n for n in backend.launches if "fwd" in n], [n for n in backend.launches if "bwd" in n]
    assert fwd[0].endswith("_v1") == (path == "v1") and bwd[0].endswith("_v1") == (path == "v1")
    assert backend.launches[-1] == "rmsnorm_dw_reduce"


def test_add_rms_norm_mixed_dtypes_strided_input_and_bf16_weight():
    # float32 residual stream + bf16 delta (autocast), x a column slice of a wider buffer
    wide = leaf(6, 50, 160, dtype=torch.float32, seed=3)
    x = wide[..., :128]
    delta = leaf(6, 50, 128, dtype=torch.bfloat16, seed=4)
    w = leaf(128, dtype=torch.bfloat16, seed=5)
    backend, ctx = emulated()
    with ctx:
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


def test_add_rms_norm_has_no_races():
    x = leaf(2, 45, 264, dtype=torch.bfloat16, seed=6)
    delta = leaf(2, 45, 264, dtype=torch.bfloat16, seed=7)
    w = leaf(264, dtype=torch.float32, seed=8)

    def run(schedule):
        with emulated(schedule, seed=11)[1]:
            h, y = add_rms_norm_cupy(x, delta, w, 1e-5)
            return (h, y, *grads([h, y], [x, delta, w]))

    harness.run_schedules(run)


def test_add_rms_norm_bad_inputs_are_clear_errors():
    x = torch.randn(4, 8)
    w = torch.ones(8)
    with emulated()[1]:
        with pytest.raises(ValueError, match="x must be float32 or bfloat16, got float16"):
            add_rms_norm_cupy(x.half(), None, w, 1e-5)
        with pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(7,\)"):
            add_rms_norm_cupy(x, None, torch.ones(7), 1e-5)
        with pytest.raises(ValueError, match=r"delta must have shape \(4, 8\)"):
            add_rms_norm_cupy(x, torch.randn(4, 9), w, 1e-5)
    with pytest.raises(ValueError, match="run on CUDA tensors, got a tensor on cpu"):
        add_rms_norm_cupy(x, None, w, 1e-5)  # no emulation installed: CPU tensors are refused


# ---------------------------------------------------------------- RoPE
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, Hk, D", [(3, 423, 2, 1, 64), (2, 7, 3, 3, 10), (1, 9, 4, 2, 32)])
def test_rope_matches_reference(dtype, B, T, H, Hk, D):
    q = leaf(B, T, H, D, dtype=dtype, seed=0)
    k = leaf(B, T, Hk, D, dtype=dtype, seed=1)
    cos, sin = rope_frequencies(T, D, 10000.0)
    backend, ctx = emulated()
    with ctx:
        qo, ko = rope_cupy(q, k, cos, sin)
        ours = grads([qo, ko], [q, k])
    qr, kr = rope_reference(q, k, cos, sin)
    ref = grads([qr, kr], [q, k])
    for a, b in zip((qo, ko, *ours), (qr, kr, *ref)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, dtype)
    assert all(n.endswith("_v1") == ((D // 2) % (4 if dtype == torch.float32 else 8) != 0) for n in backend.launches)


def test_rope_on_views_of_a_fused_qkv_projection_has_no_races():
    B, T, H, Hk, D = 2, 13, 4, 2, 32
    qkv = leaf(B, T, (H + 2 * Hk) * D, dtype=torch.bfloat16, seed=2)
    q = qkv[..., :H * D].view(B, T, H, D)
    k = qkv[..., H * D:(H + Hk) * D].view(B, T, Hk, D)
    assert not q.is_contiguous()
    cos, sin = rope_frequencies(T, D, 500.0)

    def run(schedule):
        with emulated(schedule, seed=5)[1]:
            qo, ko = rope_cupy(q, k, cos, sin)
            return (qo, ko, *grads([qo, ko], [qkv]))

    qo, ko, dqkv = harness.run_schedules(run)
    qr, kr = rope_reference(q, k, cos, sin)
    assert_close(qo, qr, torch.bfloat16)
    assert_close(ko, kr, torch.bfloat16)
    assert_close(dqkv, grads([qr, kr], [qkv])[0], torch.bfloat16)


def test_rope_bad_inputs_are_clear_errors():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    cos, sin = rope_frequencies(4, 8, 10000.0)
    with emulated()[1]:
        with pytest.raises(ValueError, match=r"cos must have shape \(4, 4\)"):
            rope_cupy(q, k, cos[:3], sin)
        with pytest.raises(ValueError, match="q must be"):
            rope_cupy(q[0], k, cos, sin)
        with pytest.raises(ValueError, match="k must be bfloat16"):
            rope_cupy(q.bfloat16(), k, cos, sin)
        with pytest.raises(ValueError, match="head dimension must be even"):
            rope_cupy(torch.randn(1, 4, 2, 7), torch.randn(1, 4, 2, 7), cos, sin)


# ---------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 423, 213), (2, 16, 256), (7,)])
def test_swiglu_matches_reference(dtype, shape):
    gate = leaf(*shape, dtype=dtype, seed=0, scale=3.0)
    up = leaf(*shape, dtype=dtype, seed=1)
    with emulated()[1]:
        out = swiglu_cupy(gate, up)
        ours = grads([out], [gate, up])
    out_ref = swiglu_reference(gate, up)
    ref = grads([out_ref], [gate, up])
    assert out.dtype == dtype
    for a, b in zip((out, *ours), (out_ref, *ref)):
        assert_close(a, b, dtype)


def test_swiglu_on_halves_of_a_fused_projection_has_no_races():
    fused = leaf(3, 11, 2 * 96, dtype=torch.float32, seed=4, scale=2.0)
    gate, up = fused.chunk(2, dim=-1)

    def run(schedule):
        backend, ctx = emulated(schedule, seed=2)
        with ctx:
            out = swiglu_cupy(gate, up)
            result = (out, *grads([out], [fused]))
        assert backend.launches == ["swiglu_fwd_f32_v4", "swiglu_bwd_f32_v4"]
        return result

    out, dfused = harness.run_schedules(run)
    out_ref = swiglu_reference(gate, up)
    assert_close(out, out_ref, torch.float32)
    assert_close(dfused, grads([out_ref], [fused])[0], torch.float32)


# ---------------------------------------------------------------- registration: opcheck, compile
def test_custom_ops_pass_opcheck():
    # schema, fake (meta) kernels, autograd registration and AOT dispatch, as torch.compile needs them
    x, d = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    w = torch.randn(64, requires_grad=True)
    q, k = torch.randn(2, 3, 2, 16, requires_grad=True), torch.randn(2, 3, 1, 16, requires_grad=True)
    cos, sin = rope_frequencies(3, 16, 10000.0)
    g, u = torch.randn(4, 40, requires_grad=True), torch.randn(4, 40, requires_grad=True)
    with emulated()[1]:
        torch.library.opcheck(add_rms_norm_op, (x.requires_grad_(), d.requires_grad_(), w, 1e-5))
        torch.library.opcheck(add_rms_norm_op, (x, None, w, 1e-5))
        torch.library.opcheck(rope_rotate_op, (q, k, cos, sin, 1.0))
        torch.library.opcheck(swiglu_op, (g, u))


def test_ops_under_torch_compile():
    torch._dynamo.reset()
    x = leaf(2, 6, 32, dtype=torch.float32, seed=0)
    delta = leaf(2, 6, 32, dtype=torch.float32, seed=1)
    w = leaf(32, dtype=torch.float32, seed=2)
    q, k = leaf(2, 6, 2, 16, dtype=torch.float32, seed=3), leaf(2, 6, 2, 16, dtype=torch.float32, seed=4)
    cos, sin = rope_frequencies(6, 16, 10000.0)

    def block(add_rms_norm, rope, swiglu, x, delta, w, q, k):
        h, y = add_rms_norm(x, delta, w, 1e-5)
        qo, ko = rope(q, k, cos, sin)
        gate, up = y.chunk(2, dim=-1)
        return swiglu(gate, up).sum() + h.square().mean() + (qo * ko).sum()

    # aot_eager traces the graph with the fake kernels and autograd formulas, then runs it
    # (inductor would also compile C++ here, which takes far longer on a CPU)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    inputs = (x, delta, w, q, k)
    with emulated()[1]:
        loss = compiled(add_rms_norm_cupy, rope_cupy, swiglu_cupy, *inputs)
        ours = torch.autograd.grad(loss, inputs)
    loss_ref = block(add_rms_norm_reference, rope_reference, swiglu_reference, *inputs)
    ref = torch.autograd.grad(loss_ref, inputs)
    torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_misaligned_inputs_take_the_scalar_path():
    # a tensor starting 2 bytes into its storage: 16-byte vector loads would fault on a GPU
    storage = leaf(1 + 4 * 256, dtype=torch.bfloat16, seed=9)
    gate = storage[1:].view(4, 256)
    up = leaf(4, 256, dtype=torch.bfloat16, seed=10)
    backend, ctx = emulated()
    with ctx:
        out = swiglu_cupy(gate, up)
        ours = grads([out], [storage, up])
    assert backend.launches == ["swiglu_fwd_bf16_v1", "swiglu_bwd_bf16_v1"]
    out_ref = swiglu_reference(gate, up)
    assert_close(out, out_ref, torch.bfloat16)
    for a, b in zip(ours, grads([out_ref], [storage, up])):
        assert_close(a, b, torch.bfloat16)


def test_tiny_gpt_with_the_emulated_kernels_matches_the_reference_model():
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
    model_ref = GPT(cfg, ref_ops)
    model = GPT(cfg, ours)
    model.load_state_dict(model_ref.state_dict())
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, dims=1)
    backend, ctx = emulated()
    with ctx:
        loss = model(idx, targets).mean()
        loss.backward()
    loss_ref = model_ref(idx, targets).mean()
    loss_ref.backward()
    assert {n.split("_")[0] for n in backend.launches} >= {"add", "rope", "swiglu", "rmsnorm"}
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for (name, p), p_ref in zip(model.named_parameters(), model_ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_kernel_arguments_get_explicit_sizes_for_cupy():
    import numpy as np

    from workbench.kernels.cupy_launch import kernel_arg

    t = torch.zeros(3)
    assert kernel_arg(t) == np.uint64(t.data_ptr()) and kernel_arg(t).dtype == np.uint64
    assert kernel_arg(None) == 0 and kernel_arg(None).dtype == np.uint64
    assert kernel_arg(7).dtype == np.int32 and kernel_arg(True).dtype == np.int32
    assert kernel_arg(0.5).dtype == np.float32
    assert kernel_arg(np.int64(5)).dtype == np.int64
    with pytest.raises(ValueError, match="does not fit int32"):
        kernel_arg(1 << 40)

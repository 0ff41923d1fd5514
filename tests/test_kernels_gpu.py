"""RMSNorm, RoPE and SwiGLU on a real GPU through CuPy, against the PyTorch reference.

Deselected by default (pyproject: -m 'not gpu'); run on a CUDA machine with CuPy installed:
    pytest -m gpu tests/test_kernels_gpu.py
Per-dtype tolerances as in Liger-Kernel's tests; forward and backward; eager, under autograd,
and under torch.compile (inductor).
"""

from __future__ import annotations

import pytest
import torch

from workbench.kernels.cupy_launch import cupy_missing

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(cupy_missing() is not None, reason=f"needs CUDA and CuPy: {cupy_missing()}")]

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol)


def leaf(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype).requires_grad_()


def grads(outputs, inputs, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen, device="cuda")).sum() for o in outputs)
    live = [i for i in inputs if i is not None]
    g = iter(torch.autograd.grad(loss, live))
    return [next(g) if i is not None else None for i in inputs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 423, 213), (8, 1024, 768), (2, 64, 4096)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm(dtype, shape, with_delta):
    from workbench.kernels.rmsnorm import add_rms_norm_cupy, add_rms_norm_reference

    x = leaf(*shape, dtype=dtype, seed=0)
    delta = leaf(*shape, dtype=dtype, seed=1) if with_delta else None
    w = leaf(shape[-1], dtype=torch.float32, seed=2)
    h, y = add_rms_norm_cupy(x, delta, w, 1e-5)
    ours = grads([h, y] if with_delta else [y], [x, delta, w])
    h_ref, y_ref = add_rms_norm_reference(x, delta, w, 1e-5)
    ref = grads([h_ref, y_ref] if with_delta else [y_ref], [x, delta, w])
    assert torch.equal(h, h_ref)
    assert_close(y, y_ref, dtype)
    for a, b in zip(ours[:2], ref[:2]):
        if b is not None:
            assert_close(a, b, dtype)
    assert_close(ours[2], ref[2], torch.float32, scale=shape[0] * shape[1] ** 0.5 * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, Hk, D", [(3, 423, 2, 1, 64), (8, 1024, 12, 12, 64), (2, 33, 4, 2, 10)])
def test_rope(dtype, B, T, H, Hk, D):
    from workbench.kernels.rope import rope_cupy, rope_frequencies, rope_reference

    q, k = leaf(B, T, H, D, dtype=dtype, seed=0), leaf(B, T, Hk, D, dtype=dtype, seed=1)
    cos, sin = rope_frequencies(T, D, 10000.0, device="cuda")
    qo, ko = rope_cupy(q, k, cos, sin)
    ours = grads([qo, ko], [q, k])
    qr, kr = rope_reference(q, k, cos, sin)
    ref = grads([qr, kr], [q, k])
    for a, b in zip((qo, ko, *ours), (qr, kr, *ref)):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 423, 213), (8, 1024, 2048)])
def test_swiglu(dtype, shape):
    from workbench.kernels.swiglu import swiglu_cupy, swiglu_reference

    gate, up = leaf(*shape, dtype=dtype, seed=0, scale=3.0), leaf(*shape, dtype=dtype, seed=1)
    out = swiglu_cupy(gate, up)
    ours = grads([out], [gate, up])
    out_ref = swiglu_reference(gate, up)
    ref = grads([out_ref], [gate, up])
    for a, b in zip((out, *ours), (out_ref, *ref)):
        assert_close(a, b, dtype)


def test_ops_on_a_side_stream_and_under_torch_compile():
    from workbench.kernels.rmsnorm import add_rms_norm_cupy, add_rms_norm_reference
    from workbench.kernels.rope import rope_cupy, rope_frequencies, rope_reference
    from workbench.kernels.swiglu import swiglu_cupy, swiglu_reference

    torch._dynamo.reset()
    x, delta = leaf(4, 64, 256, dtype=torch.bfloat16, seed=0), leaf(4, 64, 256, dtype=torch.bfloat16, seed=1)
    w = leaf(256, dtype=torch.float32, seed=2)
    q, k = leaf(4, 64, 4, 32, dtype=torch.bfloat16, seed=3), leaf(4, 64, 2, 32, dtype=torch.bfloat16, seed=4)
    cos, sin = rope_frequencies(64, 32, 10000.0, device="cuda")

    def block(add_rms_norm, rope, swiglu, x, delta, w, q, k):
        h, y = add_rms_norm(x, delta, w, 1e-5)
        qo, ko = rope(q, k, cos, sin)
        gate, up = y.chunk(2, dim=-1)
        return swiglu(gate, up).float().sum() + h.float().square().mean() + (qo.float() * ko.float().repeat(1, 1, 2, 1)).sum()

    inputs = (x, delta, w, q, k)
    compiled = torch.compile(block, fullgraph=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the kernels must run on PyTorch's current stream
        loss = compiled(add_rms_norm_cupy, rope_cupy, swiglu_cupy, *inputs)
        ours = torch.autograd.grad(loss, inputs)
    torch.cuda.current_stream().wait_stream(side)
    loss_ref = block(add_rms_norm_reference, rope_reference, swiglu_reference, *inputs)
    ref = torch.autograd.grad(loss_ref, inputs)
    torch.testing.assert_close(loss, loss_ref, atol=1e-1, rtol=2e-2)
    for a, b in zip(ours, ref):
        assert_close(a, b, torch.bfloat16, scale=5)


def test_select_and_input_errors():
    import kernels
    from workbench.kernels.swiglu import swiglu_cupy

    ops = workbench.kernels.select("cupy", "cuda")
    assert ops.name == "cupy"
    with pytest.raises(ValueError, match="run on CUDA tensors"):
        swiglu_cupy(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="up is on cpu"):
        swiglu_cupy(torch.randn(4, device="cuda"), torch.randn(4))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        swiglu_cupy(torch.randn(4, device="cuda").half(), torch.randn(4, device="cuda").half())


def test_gpt_step_under_bf16_autocast_matches_the_reference_ops():
    # float32 residual stream + bf16 sub-layer outputs: the mixed-dtype RMSNorm path
    import kernels
    from workbench.engine.config import ModelConfig
    from workbench.engine.model import GPT

    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=128, seq_len=64, vocab_size=300)
    torch.manual_seed(0)
    model_ref = GPT(cfg, workbench.kernels.select("torch", "cuda")).cuda()
    model = GPT(cfg, workbench.kernels.select("cupy", "cuda")).cuda()
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
    for (name, p), p_ref in zip(model.named_parameters(), model_ref.parameters()):
        scale = p_ref.grad.abs().max().item() + 1e-6
        assert (p.grad - p_ref.grad).abs().max().item() <= 5e-2 * scale, name

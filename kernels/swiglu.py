"""SwiGLU's elementwise part: silu(gate) * up."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.kernels.cupy_launch import aligned, backend_for, check, rows_of


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


# --- the CuPy kernel (swiglu.cu) --------------------------------------------------------------


SOURCE = "swiglu.cu"
DTYPES = (torch.float32, torch.bfloat16)
THREADS = 256


def _check(gate: Tensor, up: Tensor) -> None:
    check("swiglu", "gate", gate, dtypes=DTYPES, min_dim=1)
    check("swiglu", "up", up, dtypes=(gate.dtype,), device=gate.device, shape=tuple(gate.shape))


def _launch_shape(rows: int, cols: int, dtype: torch.dtype, aligned_ok: bool):
    vec = 4 if dtype == torch.float32 else 8
    v = vec if cols % vec == 0 and aligned_ok else 1
    threads = min(THREADS, max(32, math.ceil(cols / v / 32) * 32))
    return v, (rows, math.ceil(cols / v / threads)), (threads,)


def swiglu_forward(backend, gate: Tensor, up: Tensor) -> Tensor:
    _check(gate, up)
    g2, rows, cols, gs = rows_of(gate)
    u2, _, _, us = rows_of(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if rows == 0 or cols == 0:
        return out
    size = gate.element_size()
    v, grid, block = _launch_shape(rows, cols, gate.dtype, aligned(16, g2, u2, out, gs * size, us * size))
    backend.launch(SOURCE, f"swiglu_fwd_{'f32' if gate.dtype == torch.float32 else 'bf16'}_v{v}", grid, block,
                   [g2, u2, out, np.int32(rows), np.int32(cols), np.int64(gs), np.int64(us)])
    return out


def swiglu_backward(backend, dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    _check(gate, up)
    g2, rows, cols, gs = rows_of(gate)
    u2, _, _, us = rows_of(up)
    d2 = dout.to(gate.dtype).contiguous()
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if rows == 0 or cols == 0:
        return dgate, dup
    size = gate.element_size()
    v, grid, block = _launch_shape(rows, cols, gate.dtype,
                                   aligned(16, d2, g2, u2, dgate, dup, gs * size, us * size))
    backend.launch(SOURCE, f"swiglu_bwd_{'f32' if gate.dtype == torch.float32 else 'bf16'}_v{v}", grid, block,
                   [d2, g2, u2, dgate, dup, np.int32(rows), np.int32(cols), np.int64(gs), np.int64(us)])
    return dgate, dup


@torch.library.custom_op("workbench::swiglu", mutates_args=())
def swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return swiglu_forward(backend_for(gate.device, "swiglu"), gate, up)


@swiglu_op.register_fake
def _(gate, up):
    _check(gate, up)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("workbench::swiglu_backward", mutates_args=())
def swiglu_backward_op(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return swiglu_backward(backend_for(gate.device, "swiglu"), dout, gate, up)


@swiglu_backward_op.register_fake
def _(dout, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    return swiglu_backward_op(grad_out, gate, up)


swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu_cupy(gate: Tensor, up: Tensor) -> Tensor:
    """swiglu through the CUDA kernels (same semantics as swiglu_reference)."""
    return swiglu_op(gate, up)

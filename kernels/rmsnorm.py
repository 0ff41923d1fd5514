"""RMSNorm with the residual add fused in.

    add_rms_norm(x, delta, weight, eps) -> (h, y)   where h = x + delta (or x when delta is None)
                                                      y = h / sqrt(mean(h^2) + eps) * weight
In a pre-norm transformer this is the seam between sub-layers: it returns the new
residual stream and the normed input of the next sub-layer in one pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from workbench.kernels.cupy_launch import aligned, backend_for, check, rows_of


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if delta is None else x + delta
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return h, (y * weight.float()).to(h.dtype)


# --- the CuPy kernel (rmsnorm.cu) ------------------------------------------------------------
# torch.library custom ops, so autograd and torch.compile see one opaque op each way. The op
# returns (h, y, rstd): h is empty when delta is None (the caller's h is x itself: an op output
# may not alias an input), rstd (float32, one per row) is saved for the backward.


SOURCE = "rmsnorm.cu"
DTYPES = (torch.float32, torch.bfloat16)
FWD_WARPS = 4            # rows per block in the forward: one warp per row
BWD_WARPS = 4            # warps per block in the backward
BWD_BLOCKS_PER_SM = 8    # the backward's grid: fewer blocks, fewer dw partial rows to sum
SHARED_LIMIT = 48 * 1024


def _tag(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "bf16"


def _check_forward(x: Tensor, delta: Tensor | None, weight: Tensor) -> torch.dtype:
    """Validates the inputs; returns the dtype of h and y (x's, or float32 when either input is)."""
    op = "add_rms_norm"
    check(op, "x", x, dtypes=DTYPES, min_dim=1)
    check(op, "weight", weight, dtypes=DTYPES, device=x.device, shape=(x.shape[-1],))
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: x has an empty last dimension")
    if delta is None:
        return x.dtype
    check(op, "delta", delta, dtypes=DTYPES, device=x.device, shape=tuple(x.shape))
    return torch.promote_types(x.dtype, delta.dtype)


def add_rms_norm_forward(backend, x: Tensor, delta: Tensor | None, weight: Tensor,
                         eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Launches add_rmsnorm_fwd: returns (h or an empty tensor when delta is None, y, rstd)."""
    dtype = _check_forward(x, delta, weight)
    if delta is not None and x.dtype != dtype:
        x, delta = delta, x  # h = delta + x: the float32 operand takes x's place
    shape = x.shape
    x2, rows, C, x_stride = rows_of(x)
    d2, d_stride = None, 0
    if delta is not None:
        d2, _, _, d_stride = rows_of(delta)
    w = weight.float().contiguous()
    h = torch.empty(shape, dtype=dtype, device=x.device) if delta is not None else x.new_empty(0)
    y = torch.empty(shape, dtype=dtype, device=x.device)
    rstd = torch.empty(shape[:-1], dtype=torch.float32, device=x.device)
    if rows == 0:
        return h, y, rstd
    vec = 4 if dtype == torch.float32 else 8
    x_size, d_size = x2.element_size(), (d2.element_size() if d2 is not None else 0)
    use_vec = C % vec == 0 and aligned(16, x2, x_stride * x_size, w, h if delta is not None else None, y) \
        and aligned(vec * d_size or 1, d2, d_stride * d_size)
    tag = _tag(dtype) if delta is None or delta.dtype == dtype else "f32_bf16"
    name = f"add_rmsnorm_fwd_{tag}_v{vec if use_vec else 1}"
    grid = math.ceil(rows / FWD_WARPS)
    backend.launch(SOURCE, name, (grid,), (32 * FWD_WARPS,),
                   [x2, d2, w, h if delta is not None else None, y, rstd, np.int32(rows), np.int32(C),
                    np.int64(x_stride), np.int64(d_stride), np.float32(eps)])
    return h, y, rstd


def add_rms_norm_backward(backend, dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor,
                          rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Launches add_rmsnorm_bwd and rmsnorm_dw_reduce: returns (dx in h's dtype, dw in float32)."""
    C = h.shape[-1]
    rows = h.numel() // C
    dy = dy.to(h.dtype).contiguous()
    h = h.contiguous()
    dh = dh.to(h.dtype).contiguous() if dh is not None and dh.numel() else None
    w = weight.float().contiguous()
    rstd = rstd.contiguous()
    dx = torch.empty_like(h)
    if rows == 0:
        return dx, torch.zeros(C, dtype=torch.float32, device=h.device)
    dw = torch.empty(C, dtype=torch.float32, device=h.device)  # every column is written
    warps = BWD_WARPS
    while warps > 1 and warps * C * 4 > SHARED_LIMIT:
        warps //= 2
    if warps * C * 4 > SHARED_LIMIT:
        raise ValueError(f"add_rms_norm: rows of {C} elements are too long for the backward kernel "
                         f"(at most {SHARED_LIMIT // 4})")
    blocks = max(1, min(math.ceil(rows / warps), backend.sm_count(h.device) * BWD_BLOCKS_PER_SM))
    partial = torch.empty((blocks, C), dtype=torch.float32, device=h.device)
    vec = 4 if h.dtype == torch.float32 else 8
    use_vec = C % vec == 0 and aligned(16, dy, dh, h, w, dx)
    name = f"add_rmsnorm_bwd_{_tag(h.dtype)}_v{vec if use_vec else 1}"
    backend.launch(SOURCE, name, (blocks,), (32 * warps,),
                   [dy, dh, h, w, rstd, dx, partial, np.int32(rows), np.int32(C)], shared_bytes=warps * C * 4)
    backend.launch(SOURCE, "rmsnorm_dw_reduce", (math.ceil(C / 32),), (32, 32),
                   [partial, dw, np.int32(blocks), np.int32(C)])
    return dx, dw


@torch.library.custom_op("workbench::add_rms_norm", mutates_args=())
def add_rms_norm_op(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return add_rms_norm_forward(backend_for(x.device, "add_rms_norm"), x, delta, weight, eps)


@add_rms_norm_op.register_fake
def _(x, delta, weight, eps):
    dtype = _check_forward(x, delta, weight)
    h = x.new_empty(x.shape, dtype=dtype) if delta is not None else x.new_empty(0)
    return h, x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("workbench::add_rms_norm_backward", mutates_args=())
def add_rms_norm_backward_op(dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor,
                             rstd: Tensor) -> tuple[Tensor, Tensor]:
    return add_rms_norm_backward(backend_for(h.device, "add_rms_norm"), dy, dh, h, weight, rstd)


@add_rms_norm_backward_op.register_fake
def _(dy, dh, h, weight, rstd):
    return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty(h.shape[-1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, delta, weight, _eps = inputs
    h, _, rstd = output
    ctx.set_materialize_grads(False)  # an unused h (the final norm's) costs no zero-filled gradient
    ctx.has_delta = delta is not None
    ctx.dtypes = (x.dtype, delta.dtype if delta is not None else None, weight.dtype)
    ctx.save_for_backward(h if delta is not None else x, weight, rstd)


def _backward(ctx, grad_h, grad_y, grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    x_dtype, delta_dtype, w_dtype = ctx.dtypes
    dh = grad_h if ctx.has_delta else None
    if grad_y is None:
        grad_y = torch.zeros_like(h)
    dx, dw = add_rms_norm_backward_op(grad_y, dh, h, weight, rstd)
    return (dx.to(x_dtype), dx.to(delta_dtype) if ctx.has_delta else None, dw.to(w_dtype), None)


add_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def add_rms_norm_cupy(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """add_rms_norm through the CUDA kernels (same semantics as add_rms_norm_reference)."""
    h, y, _ = add_rms_norm_op(x, delta, weight, eps)
    return (x if delta is None else h), y

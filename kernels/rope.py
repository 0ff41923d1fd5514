"""Rotary position embedding applied to q and k together.

q: (B, T, H, D), k: (B, T, Hkv, D), cos/sin: (T, D/2) float32. The two halves of the
head dimension are rotated as pairs (x1, x2) = (x[..., :D/2], x[..., D/2:]):
    out1 = x1*cos - x2*sin,  out2 = x2*cos + x1*sin   (the GPT-NeoX / Llama layout)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from workbench.kernels.cupy_launch import aligned, backend_for, check


def rope_frequencies(seq_len: int, head_dim: int, theta: float,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :d], xf[..., d:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


# --- the CuPy kernel (rope.cu) ----------------------------------------------------------------
# One op, `workbench::rope_rotate(q, k, cos, sin, sign)`: sign = 1 rotates forward, -1 back.
# Its backward is the same op with the opposite sign (a rotation's transpose is its inverse).


SOURCE = "rope.cu"
DTYPES = (torch.float32, torch.bfloat16)
THREADS = 256          # threads per block (about)
HEADS_PER_THREAD = 4   # each thread applies its cos/sin to this many heads


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    op = "rope"
    check(op, "q", q, dtypes=DTYPES)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be (B, T, H, D), got shape {tuple(q.shape)}")
    B, T, _, D = q.shape
    if D % 2:
        raise ValueError(f"{op}: the head dimension must be even, got {D}")
    check(op, "k", k, dtypes=(q.dtype,), device=q.device)
    if k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != D:
        raise ValueError(f"{op}: k must be (B, T, Hk, D) = ({B}, {T}, Hk, {D}), got shape {tuple(k.shape)}")
    check(op, "cos", cos, dtypes=(torch.float32,), device=q.device, shape=(T, D // 2))
    check(op, "sin", sin, dtypes=(torch.float32,), device=q.device, shape=(T, D // 2))


def _heads_view(t: Tensor) -> tuple[Tensor, int]:
    """t (B, T, H, D) with each token's heads contiguous and tokens one stride apart: (t, token stride)."""
    B, T, H, D = t.shape
    s = t.stride()
    if (s[3] == 1 or D == 1) and (s[2] == D or H == 1) and (s[0] == T * s[1] or B == 1) \
            and (s[1] >= H * D or T == 1):
        return t, (s[1] if T > 1 else (s[0] if B > 1 else H * D))
    return t.contiguous(), H * D


def rope_rotate(backend, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, sign: float) -> tuple[Tensor, Tensor]:
    _check(q, k, cos, sin)
    B, T, H, D = q.shape
    Hk, half = k.shape[2], D // 2
    q2, q_stride = _heads_view(q)
    k2, k_stride = _heads_view(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, T, Hk, D), dtype=k.dtype, device=k.device)
    tokens = B * T
    if tokens == 0 or H + Hk == 0 or half == 0:
        return q_out, k_out
    vec = 4 if q.dtype == torch.float32 else 8
    size = q.element_size()
    use_vec = half % vec == 0 and aligned(16, q2, k2, q_out, k_out, cos, sin, q_stride * size, k_stride * size)
    v = vec if use_vec else 1
    bx = half // v                                    # threads across the pairs of a head
    by = max(1, min(math.ceil((H + Hk) / HEADS_PER_THREAD), THREADS // bx))  # head groups
    bz = max(1, min(THREADS // (bx * by), 64))        # tokens per block
    if bx * by * bz > 1024:
        raise ValueError(f"rope: head dimension {D} is too large for the kernel (at most {2 * 1024 * v})")
    backend.launch(SOURCE, f"rope_{'f32' if q.dtype == torch.float32 else 'bf16'}_v{v}",
                   (math.ceil(tokens / bz),), (bx, by, bz),
                   [q2, k2, cos, sin, q_out, k_out, np.int32(tokens), np.int32(T), np.int32(H), np.int32(Hk),
                    np.int32(half), np.int64(q_stride), np.int64(k_stride), np.float32(sign)])
    return q_out, k_out


@torch.library.custom_op("workbench::rope_rotate", mutates_args=())
def rope_rotate_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, sign: float) -> tuple[Tensor, Tensor]:
    return rope_rotate(backend_for(q.device, "rope"), q, k, cos, sin, sign)


@rope_rotate_op.register_fake
def _(q, k, cos, sin, sign):
    _check(q, k, cos, sin)
    return (q.new_empty(q.shape), k.new_empty(k.shape))


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, sign = inputs
    ctx.save_for_backward(cos, sin)
    ctx.sign = sign


def _backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    dq, dk = rope_rotate_op(grad_q, grad_k, cos, sin, -ctx.sign)
    return dq, dk, None, None, None


rope_rotate_op.register_autograd(_backward, setup_context=_setup_context)


def rope_cupy(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """rope through the CUDA kernel (same semantics as rope_reference)."""
    return rope_rotate_op(q, k, cos, sin, 1.0)

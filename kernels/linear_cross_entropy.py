"""The lm-head matmul and the cross-entropy loss, per token.

h: (N, C) hidden states, weight: (V, C) the output embedding, targets: (N,) int64 with
`ignore_index` marking positions that carry no loss. Returns the per-token loss
(N,) in float32, zero at ignored positions, so callers can sum, average or weigh it
by bytes (bits per byte). The fused kernel never materialises the (N, V) logits.

The fused op (`linear_cross_entropy_cupy`, CUDA, like Liger-Kernel's FusedLinearCrossEntropy and llm.c):
tokens go through in chunks of about CHUNK_LOGITS logits. For each chunk, cuBLAS computes the
logits (h_chunk @ W^T), `linear_cross_entropy.cu` turns them into the per-token loss and
overwrites them in place with their gradient (softmax - onehot), and cuBLAS turns that into
dh_chunk = dlogits @ W and dW += dlogits^T @ h_chunk (fp32 accumulator). Only one chunk of logits
exists at any time: at V=32768, N=8192 that is 128 MiB instead of the ~3 GiB of the unfused op.

Why the gradient is computed in the forward pass (as Liger does) and not recomputed in backward:
recomputing costs one more (N x C x V) matmul, a quarter more FLOPs than the whole unfused op,
and the loss is almost always reduced by a sum or a mean, where the upstream gradient is the same
for every counted token. Backward then only scales: dh = g[:, None] * dh_unit exactly (row-wise),
and dW = g0 * dW_unit when g is uniform over the non-ignored tokens. A per-token upstream gradient
that is *not* uniform (a weighted loss) cannot be recovered from dW_unit, so backward then
recomputes dW chunk by chunk with the kernel scaling each row by its own g: always exact, slower
only for that rare case. Telling the two apart costs one device sync in backward (none when g is an
expanded scalar, as `loss.sum()` gives in eager mode). With no grad needed (eval, sampling) the
forward computes the loss only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.kernels.cupy_launch import backend_for, check

SOURCE = "linear_cross_entropy.cu"
# Logits per chunk: 128 MiB in bf16, 2048 tokens at V=32768 (4 chunks at N=8192). Smaller chunks
# cost time, not just launches: dW += dlogits^T @ h reads and writes the whole fp32 (V, C)
# accumulator once per chunk, which a K of 2048 tokens per matmul keeps compute-bound.
CHUNK_LOGITS = 1 << 26
MAX_BLOCK_THREADS = 512  # one block per row; 4 blocks per SM keep the rows in flight inside L2
DTYPES = (torch.float32, torch.bfloat16)


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -1) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")


# --- the chunk kernel ---------------------------------------------------------------------------
# Launched through a backend (kernels/cupy_launch.py): CuPy on CUDA tensors, and in the CPU tests
# the emulation harness's EmulationBackend, so everything in this file runs unchanged around it.


def chunk_kernel(backend, logits: Tensor, targets: Tensor, loss: Tensor | None,
                 grad_scale: Tensor | None, ignore_index: int, write_grad: bool) -> None:
    """Loss of each row of `logits` (rows, V) into `loss`; with write_grad, the logits' gradient in place.
    logits, targets (int64), loss and grad_scale (float32) must be contiguous."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    name = "lce_chunk_f32" if logits.dtype == torch.float32 else "lce_chunk_bf16"
    accesses = -(-vocab * logits.element_size() // 16)  # 16-byte accesses per row
    threads = min(MAX_BLOCK_THREADS, max(32, -(-accesses // 32) * 32))
    backend.launch(SOURCE, name, (rows,), (threads,),
                   [logits, targets, loss, grad_scale, np.int32(vocab), np.int64(ignore_index),
                    np.int32(write_grad)])


# --- the chunked algorithm ----------------------------------------------------------------------

_ADDMM_FP32: dict[str, bool] = {}


def _add_matmul_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b, with bf16 a and b multiplied by cuBLAS straight into the fp32 accumulator
    where this torch can (addmm with out_dtype), else through a temporary in a's dtype (each chunk's
    partial sum then rounds to bf16 once)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    key = str(acc.device)
    if key not in _ADDMM_FP32:  # check once per device that the fp32-output matmul exists and is right
        try:
            # fixed values, not randn: the probe must not move the training run's RNG
            x = (torch.arange(128, device=acc.device).reshape(8, 16) % 7 - 3).to(a.dtype)
            y = (torch.arange(64, device=acc.device).reshape(16, 4) % 5 - 2).to(a.dtype)
            out = torch.ones(8, 4, device=acc.device)
            torch.addmm(out, x, y, out_dtype=torch.float32, out=out)
            _ADDMM_FP32[key] = torch.allclose(out, 1 + x.float() @ y.float(), rtol=1e-2, atol=1e-2)
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_FP32[key] = False
    if _ADDMM_FP32[key]:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif acc.device.type == "cpu":  # (the emulation tests) fp32 matmuls cost no more there
        acc.addmm_(a.float(), b.float())
    else:
        acc.add_(a @ b)


def chunk_rows(n_tokens: int, vocab: int, chunk_logits: int | None = None) -> int:
    """Tokens per chunk: about `chunk_logits` (default CHUNK_LOGITS) logits, at least one row."""
    return max(1, min(n_tokens, (chunk_logits or CHUNK_LOGITS) // max(vocab, 1)))


def _logit_chunks(h: Tensor, w: Tensor, chunk_logits: int | None):
    """(start, end, logits) for each chunk of tokens: logits = h[start:end] @ w^T (cuBLAS), in one
    buffer reused by every chunk."""
    n, vocab = h.shape[0], w.shape[0]
    rows = chunk_rows(n, vocab, chunk_logits)
    buffer = torch.empty(rows, vocab, dtype=h.dtype, device=h.device)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        logits = buffer[:end - start]
        torch.mm(h[start:end], w.t(), out=logits)
        yield start, end, logits


def fused_forward(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, grad_h: bool,
                  grad_weight: bool, backend,
                  chunk_logits: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token loss, and (if asked) the gradients for an upstream gradient of 1 per token:
    dh_unit (N, C) in h's dtype and dW_unit (V, C) in fp32. Unused gradients are empty tensors."""
    h = h.contiguous()
    targets = targets.to(torch.int64).contiguous()
    w = weight.to(h.dtype)  # the matmul runs in h's dtype (autocast has cast h already)
    n, c = h.shape
    vocab = w.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if grad_h else h.new_empty(0)
    dw = torch.zeros(vocab, c, dtype=torch.float32, device=h.device) if grad_weight else loss.new_empty(0)
    for start, end, logits in _logit_chunks(h, w, chunk_logits):
        chunk_kernel(backend, logits, targets[start:end], loss[start:end], None, ignore_index,
                     grad_h or grad_weight)
        if grad_h:
            torch.mm(logits, w, out=dh[start:end])
        if grad_weight:
            _add_matmul_fp32(dw, logits.t(), h[start:end])
    return loss, dh, dw


def _uniform_grad(grad_loss: Tensor, targets: Tensor, ignore_index: int) -> Tensor | None:
    """The upstream gradient's value as a 0-d tensor when it is the same for every counted token
    (sum or mean of the loss), else None."""
    if grad_loss.numel() == 0 or grad_loss.stride(0) == 0:  # an expanded scalar: no sync needed
        return grad_loss.reshape(-1)[0] if grad_loss.numel() else grad_loss.new_zeros(())
    valid = targets != ignore_index
    inf = torch.tensor(float("inf"), device=grad_loss.device)
    high = torch.where(valid, grad_loss, -inf).amax()
    low = torch.where(valid, grad_loss, inf).amin()
    if bool(high <= low):  # the one device sync of this op
        return torch.where(valid.any(), high, 0.0)
    return None


def fused_backward(grad_loss: Tensor, h: Tensor, weight: Tensor, targets: Tensor, dh_unit: Tensor,
                   dw_unit: Tensor, ignore_index: int, grad_h: bool, grad_weight: bool, backend,
                   chunk_logits: int | None = None) -> tuple[Tensor, Tensor]:
    """dh and dW for the per-token upstream gradient `grad_loss`, from fused_forward's unit gradients."""
    grad_loss = grad_loss.float()
    targets = targets.to(torch.int64)
    dh = (dh_unit * grad_loss[:, None]).to(h.dtype) if grad_h else h.new_empty(0)
    if not grad_weight:
        return dh, weight.new_empty(0)
    scale = _uniform_grad(grad_loss, targets, ignore_index)
    if scale is not None:
        return dh, (dw_unit * scale).to(weight.dtype)
    # A weighted loss: recompute dW with each row of the logits' gradient scaled by its own g.
    h = h.contiguous()
    targets = targets.contiguous()
    grad_loss = grad_loss.contiguous()
    w = weight.to(h.dtype)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=h.device)
    for start, end, logits in _logit_chunks(h, w, chunk_logits):
        chunk_kernel(backend, logits, targets[start:end], None, grad_loss[start:end], ignore_index, True)
        _add_matmul_fp32(dw, logits.t(), h[start:end])
    return dh, dw.to(weight.dtype)


# --- the op, registered with torch.library ------------------------------------------------------

@torch.library.custom_op("workbench::linear_cross_entropy_fwd", mutates_args=())
def _forward_op(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, grad_h: bool,
                grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen here, not by autocast
        return fused_forward(h, weight, targets, ignore_index, grad_h, grad_weight,
                             backend_for(h.device, "linear_cross_entropy"))


@_forward_op.register_fake
def _(h, weight, targets, ignore_index, grad_h, grad_weight):
    n, c = h.shape
    loss = h.new_empty(n, dtype=torch.float32)
    dh = h.new_empty(n, c) if grad_h else h.new_empty(0)
    dw = h.new_empty(weight.shape[0], c, dtype=torch.float32) if grad_weight else loss.new_empty(0)
    return loss, dh, dw


@torch.library.custom_op("workbench::linear_cross_entropy_bwd", mutates_args=())
def _backward_op(grad_loss: Tensor, h: Tensor, weight: Tensor, targets: Tensor, dh_unit: Tensor,
                 dw_unit: Tensor, ignore_index: int, grad_h: bool,
                 grad_weight: bool) -> tuple[Tensor, Tensor]:
    with torch.autocast(h.device.type, enabled=False):
        return fused_backward(grad_loss, h, weight, targets, dh_unit, dw_unit, ignore_index, grad_h,
                              grad_weight, backend_for(h.device, "linear_cross_entropy"))


@_backward_op.register_fake
def _(grad_loss, h, weight, targets, dh_unit, dw_unit, ignore_index, grad_h, grad_weight):
    return (torch.empty_like(h) if grad_h else h.new_empty(0),
            torch.empty_like(weight) if grad_weight else weight.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    h, weight, targets, ignore_index, grad_h, grad_weight = inputs
    _, dh_unit, dw_unit = output
    ctx.mark_non_differentiable(dh_unit, dw_unit)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, weight, targets, dh_unit, dw_unit)
    ctx.flags = (ignore_index, grad_h, grad_weight)


def _backward(ctx, grad_loss, _grad_dh_unit, _grad_dw_unit):
    ignore_index, grad_h, grad_weight = ctx.flags
    if grad_loss is None:
        return None, None, None, None, None, None
    h, weight, targets, dh_unit, dw_unit = ctx.saved_tensors
    dh, dw = _backward_op(grad_loss, h, weight, targets, dh_unit, dw_unit, ignore_index, grad_h,
                          grad_weight)
    return (dh if grad_h else None), (dw if grad_weight else None), None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(h: Tensor, weight: Tensor, targets: Tensor) -> None:
    """Raise ValueError with a clear message for inputs the fused op cannot take."""
    op = "linear_cross_entropy"
    check(op, "h", h, dtypes=DTYPES)
    if h.dim() != 2:
        raise ValueError(f"{op}: h must be (tokens, C), got shape {tuple(h.shape)}")
    check(op, "weight", weight, dtypes=DTYPES, device=h.device)
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"{op}: weight must be (vocab, {h.shape[1]}), got shape {tuple(weight.shape)}")
    check(op, "targets", targets, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8),
          device=h.device, shape=h.shape[:1])


def linear_cross_entropy_cupy(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """The fused op through linear_cross_entropy.cu (same semantics as linear_cross_entropy_reference)."""
    check_inputs(h, weight, targets)
    if torch.is_autocast_enabled(h.device.type):  # custom ops are not autocast: cast h as matmul would
        h = h.to(torch.get_autocast_dtype(h.device.type))
    need = torch.is_grad_enabled()
    loss, _, _ = _forward_op(h, weight, targets, int(ignore_index), need and h.requires_grad,
                             need and weight.requires_grad)
    return loss

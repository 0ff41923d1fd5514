"""AdamW over all parameters. The reference is torch.optim.AdamW itself.

Whatever implementation runs, the optimizer state per parameter is
{"step": scalar float32 tensor, "exp_avg": fp32, "exp_avg_sq": fp32}, exactly like
torch.optim.AdamW's, so checkpoints move between implementations.

`AdamW` below is the multi-tensor CUDA version (`adamw.cu`): one launch per (param group, dtype,
step count) updates every parameter of it, with the pointers, sizes and chunk offsets of all its
tensors in one small int64 array copied to the device each step (grads may move between steps).
"step" lives on the CPU, as in torch's non-fused AdamW, so the bias corrections are computed on the
host in double (no device sync) and passed to the kernel with the lr of this step. The moments stay
fp32 even for bf16 parameters (torch's own AdamW would keep them in the param's dtype); loading a
state dict keeps them fp32, and torch.optim.AdamW loading ours casts them as it always does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import chain

import numpy as np
import torch
from torch import Tensor

from workbench.kernels.cupy_launch import backend_for

SOURCE = "adamw.cu"
CHUNK_SIZE = 65536  # elements per block: ~1900 blocks for GPT-2 small's 124M parameters
BLOCK_THREADS = 512
DTYPES = (torch.float32, torch.bfloat16)


def adamw_reference(param_groups, lr: float, betas: tuple[float, float], eps: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def launch_adamw(backend, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                 exp_avg_sqs: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, step: float, chunk_size: int = CHUNK_SIZE,
                 block: int = BLOCK_THREADS) -> None:
    """One AdamW step over same-dtype, contiguous tensors that share step and hyper-parameters."""
    if not params:
        return
    n = len(params)
    first_chunk = [0]
    for p in params:
        first_chunk.append(first_chunk[-1] + -(-p.numel() // chunk_size))
    meta = [t.data_ptr() for t in chain(params, grads, exp_avgs, exp_avg_sqs)]
    meta += [p.numel() for p in params] + first_chunk
    meta_host = torch.tensor(meta, dtype=torch.int64)
    device = params[0].device
    if device.type == "cuda":  # pinned, so the copy is asynchronous and ordered on the stream
        meta_dev = meta_host.pin_memory().to(device, non_blocking=True)
    else:
        meta_dev = meta_host
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    name = "adamw_f32" if params[0].dtype == torch.float32 else "adamw_bf16"
    f32 = np.float32
    backend.launch(SOURCE, name, (first_chunk[-1],), (block,),
                   [meta_dev, np.int32(n), np.int64(chunk_size), f32(1 - lr * weight_decay), f32(1 - beta1),
                    f32(beta2), f32(1 - beta2), f32(-lr / bc1), f32(math.sqrt(bc2)), f32(eps)])


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update and state, computed by the multi-tensor kernel in adamw.cu.

    Not supported (raise): amsgrad, maximize, sparse gradients. `backend` launches the kernels
    (default: workbench.kernels.cupy_launch.backend_for the params' device: CuPy on CUDA)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, backend=None,
                 chunk_size: int = CHUNK_SIZE, block: int = BLOCK_THREADS):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if chunk_size % 4:
            raise ValueError("chunk_size must be a multiple of 4 (the kernel's vector width)")
        # Every key torch.optim.AdamW's groups have, so it reads our state dict as its own: a missing
        # decoupled_weight_decay would make it default to False there, i.e. Adam with L2 decay.
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=False, foreach=None, capturable=False, differentiable=False,
                        fused=None, decoupled_weight_decay=True)
        super().__init__(params, defaults)
        self._backend = backend
        self._chunk_size = chunk_size
        self._block = block

    def _state_for(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize") or not group.get("decoupled_weight_decay", True):
                raise ValueError("this AdamW supports neither amsgrad, maximize nor Adam's coupled "
                                 "(L2) weight decay")
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state_for(p) for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            step_values = torch.stack(steps).tolist()  # CPU tensors: no device sync
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            # One launch per (device, dtype, step): usually one per group.
            buckets: dict[tuple, list[tuple[Tensor, dict]]] = defaultdict(list)
            for p, state, step in zip(params, states, step_values, strict=True):
                if p.grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                if p.dtype not in DTYPES:
                    raise ValueError(f"AdamW kernels take float32 or bfloat16 parameters, got {p.dtype}")
                buckets[(p.device, p.dtype, step)].append((p, state))
            for (device, _dtype, step), members in buckets.items():
                self._update(device, members, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"], step=step)
        return loss

    def _update(self, device, members, **hyper) -> None:
        backend = self._backend or backend_for(device, "AdamW")
        params, grads, exp_avgs, exp_avg_sqs, copy_back = [], [], [], [], []
        for p, state in members:
            param = p if p.is_contiguous() else p.contiguous()  # updated in a copy, copied back below
            if param is not p:
                copy_back.append((p, param))
            params.append(param)
            grads.append(p.grad.to(p.dtype).contiguous())
            for key, out in (("exp_avg", exp_avgs), ("exp_avg_sq", exp_avg_sqs)):
                if not state[key].is_contiguous() or state[key].dtype != torch.float32:
                    state[key] = state[key].float().contiguous()
                out.append(state[key])
        launch_adamw(backend, params, grads, exp_avgs, exp_avg_sqs, chunk_size=self._chunk_size,
                     block=self._block, **hyper)
        for p, param in copy_back:
            p.copy_(param)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that the moments stay float32 whatever the param's dtype
        (torch would cast them to it, losing bits for bf16 parameters) and step stays on the CPU."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params, strict=True):  # super() checked the group sizes
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True).contiguous()
            if "step" in saved:
                state["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32)


def adamw_cupy(param_groups, lr: float, betas: tuple[float, float], eps: float,
               fused: bool = True) -> AdamW:
    """The Ops entry: the same call as adamw_reference, with the multi-tensor kernel (always fused)."""
    return AdamW(param_groups, lr=lr, betas=betas, eps=eps)

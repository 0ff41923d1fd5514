"""RMSNorm with the residual add fused in.

    add_rms_norm(x, delta, weight, eps) -> (h, y)   where h = x + delta (or x when delta is None)
                                                      y = h / sqrt(mean(h^2) + eps) * weight
In a pre-norm transformer this is the seam between sub-layers: it returns the new
residual stream and the normed input of the next sub-layer in one pass.
"""

from __future__ import annotations

import torch


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if delta is None else x + delta
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return h, (y * weight.float()).to(h.dtype)

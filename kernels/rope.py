"""Rotary position embedding applied to q and k together.

q: (B, T, H, D), k: (B, T, Hkv, D), cos/sin: (T, D/2) float32. The two halves of the
head dimension are rotated as pairs (x1, x2) = (x[..., :D/2], x[..., D/2:]):
    out1 = x1*cos - x2*sin,  out2 = x2*cos + x1*sin   (the GPT-NeoX / Llama layout)
"""

from __future__ import annotations

import torch


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

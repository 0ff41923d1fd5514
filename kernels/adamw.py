"""AdamW over all parameters. The reference is torch.optim.AdamW itself.

Whatever implementation runs, the optimizer state per parameter is
{"step": scalar float32 tensor, "exp_avg": fp32, "exp_avg_sq": fp32}, exactly like
torch.optim.AdamW's, so checkpoints move between implementations.
"""

from __future__ import annotations

import torch


def adamw_reference(param_groups, lr: float, betas: tuple[float, float], eps: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=fused or None)

"""The lm-head matmul and the cross-entropy loss, per token.

h: (N, C) hidden states, weight: (V, C) the output embedding, targets: (N,) int64 with
`ignore_index` marking positions that carry no loss. Returns the per-token loss
(N,) in float32, zero at ignored positions, so callers can sum, average or weigh it
by bytes (bits per byte). The fused kernel never materialises the (N, V) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -1) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")

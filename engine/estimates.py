"""Size, cost and time estimates for a model shape, in plain Python (no torch).

The TUI's design screen calls these for live estimates and workbench.engine.model checks
its real parameter count against `param_count`, so the two never drift apart.
FLOPs follow the PaLM/nanoGPT convention: 6 * (matmul parameters) per token for
forward+backward, plus 12 * n_layer * d_model * seq_len for attention scores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Dense (no sparsity) peak TFLOP/s by device, bf16 tensor cores and plain fp32.
# Matched by substring of the device name, first match wins (so "H100 PCIe" precedes "H100").
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("GH200", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("H800", 989.0, 67.0),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("A6000", 155.0, 38.7),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
]


def ffn_width(d_model: int, d_ff: int = 0) -> int:
    """SwiGLU hidden width: explicit, or 8/3 * d_model rounded up to a multiple of 32."""
    if d_ff:
        return d_ff
    return ((8 * d_model // 3) + 31) // 32 * 32


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab_size: int
    n_kv_head: int = 0
    d_ff: int = 0
    tie_embeddings: bool = True

    @classmethod
    def of(cls, model_cfg, vocab_size: int | None = None) -> Shape:
        return cls(model_cfg.n_layer, model_cfg.n_head, model_cfg.d_model, model_cfg.seq_len,
                   vocab_size or model_cfg.vocab_size, model_cfg.n_kv_head, model_cfg.d_ff,
                   model_cfg.tie_embeddings)

    @property
    def kv_dim(self) -> int:
        return (self.n_kv_head or self.n_head) * (self.d_model // self.n_head)

    @property
    def layer_params(self) -> int:
        c, f = self.d_model, ffn_width(self.d_model, self.d_ff)
        return 2 * c * c + 2 * c * self.kv_dim + 3 * c * f + 2 * c


def param_count(s: Shape) -> int:
    """Every trainable parameter (tied embeddings counted once)."""
    embed = s.vocab_size * s.d_model
    head = 0 if s.tie_embeddings else s.vocab_size * s.d_model
    return embed + head + s.n_layer * s.layer_params + s.d_model


def matmul_params(s: Shape) -> int:
    """Parameters that take part in matmuls per token (the embedding lookup does not; the lm head does)."""
    c, f = s.d_model, ffn_width(s.d_model, s.d_ff)
    return s.n_layer * (2 * c * c + 2 * c * s.kv_dim + 3 * c * f) + s.vocab_size * c


def flops_per_token(s: Shape) -> int:
    """Training FLOPs (forward + backward) per token."""
    return 6 * matmul_params(s) + 12 * s.n_layer * s.d_model * s.seq_len


def train_memory_bytes(s: Shape, batch_size: int, bf16: bool) -> int:
    """Rough peak training memory: fp32 weights, grads and AdamW moments, plus activations and logits."""
    states = 16 * param_count(s)
    act_bytes = 2 if bf16 else 4
    tokens = batch_size * s.seq_len
    activations = tokens * s.n_layer * s.d_model * 18 * act_bytes
    logits = tokens * s.vocab_size * 4 * 2
    return states + activations + logits


def peak_flops(device_name: str, bf16: bool) -> float | None:
    """Dense peak FLOP/s for a GPU by name, or None when the device is not in the table."""
    for key, bf16_tf, fp32_tf in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return (bf16_tf if bf16 else fp32_tf) * 1e12
    return None


def cpu_flops_per_cycle() -> int:
    """fp32 FLOPs per cycle per core: two FMA units x vector lanes x 2 (AVX-512: 64, AVX2: 32, else 8)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return 32
    return 64 if "avx512f" in flags else 32 if "avx2" in flags else 8


def cpu_peak_flops(threads: int | None = None) -> float:
    """fp32 peak for this CPU: cores x clock x FLOPs per cycle."""
    import psutil

    freq = psutil.cpu_freq()
    ghz = (freq.max or freq.current) / 1000 if freq and (freq.max or freq.current) else 2.5
    cores = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return float(cores) * ghz * 1e9 * cpu_flops_per_cycle()


def recommended_tokens(s: Shape) -> int:
    """Chinchilla's ~20 training tokens per parameter."""
    return 20 * param_count(s)

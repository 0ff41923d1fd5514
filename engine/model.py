"""The GPT: a decoder-only transformer in one readable file (after nanoGPT's model.py).

Pre-norm blocks with RMSNorm, rotary position embeddings, SwiGLU, no biases, optional
grouped-query attention (n_kv_head < n_head) and optional tied input/output embeddings.
Every elementwise op and the loss go through `workbench.kernels.select(...)` -> Ops, so the same
model runs on the PyTorch references (CPU) or the CuPy kernels (CUDA). The residual add
is fused into the norm: `add_rms_norm(residual, delta, w)` returns the new residual and
the normed input of the next sub-layer.

Shapes: B batch, T time, C d_model, H query heads, K key/value heads, D head size, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.engine import estimates
from workbench.engine.config import ModelConfig
from workbench.engine.errors import ConfigError
from workbench.kernels import Ops
from workbench.kernels.rope import rope_frequencies


class RMSNorm(nn.Module):
    """Only holds the weight: the norm itself is `ops.add_rms_norm`, fused with the residual add."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class KVCache:
    """Keys and values of every layer for the positions seen so far (generation only).

    Buffers are allocated on the first write, in the dtype the layer produces (bf16 under autocast).
    """

    def __init__(self, n_layer: int, max_len: int):
        self.n_layer, self.max_len = n_layer, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0  # positions already cached (the next token's position)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at the current position; return all keys and values so far."""
        B, K, T, D = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, K, self.max_len, D)
            self.v[layer] = v.new_empty(B, K, self.max_len, D)
        end = self.pos + T
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        kv_dim = self.n_kv_head * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, ops: Ops, cos, sin, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([C, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        q, k = ops.rope(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, D)
        gqa = self.n_kv_head != self.n_head
        if cache is None or cache.pos == 0:
            if cache is not None:
                cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # Query i (at position pos+i) sees keys 0..pos+i; is_causal would align the mask top-left.
            start = cache.pos
            k, v = cache.update(layer, k, v)
            # One new token (every decoding step) sees every cached key: no mask to build.
            mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU: w_out(silu(x W_gate) * (x W_up)), gate and up computed by one matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = estimates.ffn_width(cfg.d_model, cfg.d_ff)
        self.w_in = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x, ops: Ops):
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(ops.swiglu(gate, up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ConfigError("model.vocab_size is not set (it normally comes from the dataset's tokenizer)")
        self.cfg, self.ops = cfg, ops
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_frequencies(cfg.seq_len, cfg.d_model // cfg.n_head, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @property
    def shape(self) -> estimates.Shape:
        return estimates.Shape.of(self.cfg)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; the projections into the residual stream scaled by
        1/sqrt(2 * n_layer) (GPT-2) so the stream's variance does not grow with depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.w_out.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, C) for token ids idx (B, T)."""
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        if pos + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {pos + T} tokens is longer than model.seq_len {self.cfg.seq_len}")
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        eps, ops = self.cfg.norm_eps, self.ops
        residual, delta = self.wte(idx), None
        for i, block in enumerate(self.blocks):
            residual, y = ops.add_rms_norm(residual, delta, block.attn_norm.weight, eps)
            delta = block.attn(y, ops, cos, sin, cache, i)
            residual, y = ops.add_rms_norm(residual, delta, block.mlp_norm.weight, eps)
            delta = block.mlp(y, ops)
        _, y = ops.add_rms_norm(residual, delta, self.norm.weight, eps)
        if cache is not None:
            cache.pos += T
        return y

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                ignore_index: int = -1) -> torch.Tensor:
        """With targets (B, T): the per-token loss (B, T) in float32 (0 where ignored).
        Without: the logits (B, T, V)."""
        y = self.hidden(idx)
        if targets is None:
            return F.linear(y, self.output_weight).float()
        B, T, C = y.shape
        loss = self.ops.linear_cross_entropy(y.reshape(B * T, C), self.output_weight,
                                             targets.reshape(B * T), ignore_index)
        return loss.view(B, T)

    # --- size and cost -------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        return estimates.flops_per_token(self.shape)

    def memory_estimate(self, batch_size: int, bf16: bool) -> int:
        return estimates.train_memory_bytes(self.shape, batch_size, bf16)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on the 2-D weights (matmuls and embeddings), none on norm gains."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    # --- generation ----------------------------------------------------------------------

    def _next_logits(self, ids: list[int], cache: KVCache | None, fed: int) -> torch.Tensor:
        """Logits for the token after `ids`. With a cache, only the tokens not yet fed run."""
        device = self.wte.weight.device
        window = ids[-self.cfg.seq_len:]
        if cache is None or len(ids) > self.cfg.seq_len:
            # No cache, or the context slides past seq_len: positions shift, so recompute the window.
            x = torch.tensor([window], dtype=torch.long, device=device)
            return F.linear(self.hidden(x)[:, -1], self.output_weight).float()
        if len(ids) - fed == 1 and self.ops.name == "torch" and cache.pos > 0:
            return self._decode_step(ids[-1], cache)
        x = torch.tensor([ids[fed:]], dtype=torch.long, device=device)
        return F.linear(self.hidden(x, cache)[:, -1], self.output_weight).float()

    def _decode_step(self, token: int, cache: KVCache) -> torch.Tensor:
        """Logits (1, V) after one more token: `hidden` for T = 1 on the reference ops, written out
        as plain tensor calls. Decoding a small model on the CPU is bound by per-op overhead, and
        this does the same math in about a third of the calls (one fused rms_norm, q and k
        rotated together, no module dispatch)."""
        C, eps = self.cfg.d_model, self.cfg.norm_eps
        attn0 = self.blocks[0].attn
        H, K, D = attn0.n_head, attn0.n_kv_head, attn0.head_dim
        half, gqa, qk_dim = D // 2, K != H, (H + K) * D
        cos, sin = self.rope_cos[cache.pos], self.rope_sin[cache.pos]
        weights = self.__dict__.get("_decode_weights")
        if weights is None:  # the Parameters themselves: optimizer steps and .to() update them in place
            weights = self.__dict__["_decode_weights"] = [
                (b.attn_norm.weight, b.attn.qkv.weight, b.attn.proj.weight, b.mlp_norm.weight, b.mlp.w_in.weight,
                 b.mlp.w_out.weight) for b in self.blocks]
        x = self.wte.weight[token].view(1, 1, C)
        for i, (attn_norm, qkv_w, proj_w, mlp_norm, w_in, w_out) in enumerate(weights):
            y = _rms_norm(x, attn_norm, eps)
            qkv = F.linear(y, qkv_w)
            qk = qkv[0, 0, :qk_dim].view(H + K, D).float()
            x1, x2 = qk[:, :half], qk[:, half:]
            qk = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(qkv.dtype)
            k, v = cache.update(i, qk[H:].view(1, K, 1, D), qkv[0, 0, qk_dim:].view(1, K, 1, D))
            att = F.scaled_dot_product_attention(qk[:H].view(1, H, 1, D), k, v, enable_gqa=gqa)
            x = x + F.linear(att.view(1, 1, C), proj_w)
            gate, up = F.linear(_rms_norm(x, mlp_norm, eps), w_in).chunk(2, dim=-1)
            x = x + F.linear((F.silu(gate.float()) * up.float()).to(gate.dtype), w_out)
        cache.pos += 1
        return F.linear(_rms_norm(x, self.norm.weight, eps).view(1, C), self.output_weight).float()

    def generate(self, prompt: list[int], max_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, stop_ids: Iterable[int] = (), seed: int | None = None,
                 use_cache: bool = True) -> list[int]:
        """Sample up to `max_tokens` tokens after `prompt`; stop early at any of `stop_ids`
        (not included in the result). temperature 0 is greedy. Same seed, same output."""
        return list(self.stream(prompt, max_tokens, temperature, top_k, top_p, stop_ids, seed, use_cache))

    @torch.no_grad()
    def stream(self, prompt: list[int], max_tokens: int, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, stop_ids: Iterable[int] = (), seed: int | None = None,
               use_cache: bool = True) -> Iterator[int]:
        """`generate`, one token id at a time as each is sampled (the warm chat service streams these)."""
        if not prompt:
            raise ValueError("generate needs at least one prompt token (usually <|bos|>)")
        device = self.wte.weight.device
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()  # fresh entropy for this generator only; the global RNG stays untouched
        else:
            gen.manual_seed(seed)
        stop = set(stop_ids)
        ids = list(prompt)
        cache = KVCache(self.cfg.n_layer, self.cfg.seq_len) if use_cache else None
        fed = 0
        for _ in range(max_tokens):
            logits = self._next_logits(ids, cache, fed)[0]
            fed = len(ids)
            token = sample_token(logits, temperature, top_k, top_p, gen)
            if token in stop:
                return
            ids.append(token)
            yield token


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """add_rms_norm_reference's y in one call (float32 math, the input's dtype out)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 gen: torch.Generator) -> int:
    """Pick one token id from logits (V,): greedy at temperature 0, else top-k, then top-p
    (the smallest set of tokens whose probability reaches top_p), then sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))

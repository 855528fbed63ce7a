"""Pre-LN transformer block shared by the encoder (bidirectional) and GPT (causal)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention on F.scaled_dot_product_attention (flash kernels on GPU)."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, causal: bool = False,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.heads(x)
        b, t, c = x.shape
        # key_padding_mask is True at padded positions; SDPA wants True where attending.
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.attn_dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, -1)))

    def heads(self, x: torch.Tensor):
        """q, k and v, each (B, heads, T, head_dim). The head count is read from the
        projection's output: a tensor-parallel rank computes only its own heads."""
        b, t, c = x.shape
        return (z.view(b, t, -1, c // self.n_heads).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=2))

    def forward_cached(self, x: torch.Tensor, cache: "LayerCache", start: int) -> torch.Tensor:
        """Causal attention of the tokens `x` (B, t) at positions start.. over themselves and
        the `start` tokens before them, whose keys and values are in `cache` (inference only)."""
        q, k, v = self.heads(x)
        b, t, c = x.shape
        cache.keys[:, :, start:start + t] = k
        cache.values[:, :, start:start + t] = v
        if start == 0:  # a fresh prompt: exactly the training forward's attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # token i of x sees every cached token and x's tokens up to i
            keys, values = cache.keys[:, :, :start + t], cache.values[:, :, :start + t]
            mask = None if t == 1 else (torch.arange(start + t, device=x.device)
                                        <= torch.arange(start, start + t, device=x.device)[:, None])
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class LayerCache:
    """One attention layer's keys and values, room for `capacity` tokens."""

    def __init__(self, batch: int, n_heads: int, capacity: int, head_dim: int, like: torch.Tensor):
        shape = (batch, n_heads, capacity, head_dim)
        self.keys = like.new_zeros(shape)
        self.values = like.new_zeros(shape)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int = 4, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(dim, mlp_ratio * dim, bias=bias)
        self.proj = nn.Linear(mlp_ratio * dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 bias: bool = True, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.ln_1 = nn.LayerNorm(dim, bias=bias)
        self.attn = SelfAttention(dim, n_heads, dropout, bias)
        self.ln_2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = FeedForward(dim, mlp_ratio, dropout, bias)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=self.causal, key_padding_mask=key_padding_mask)
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: torch.Tensor, cache: LayerCache, start: int) -> torch.Tensor:
        """forward() of a causal block at inference, for tokens that follow `start` cached ones."""
        x = x + self.attn.forward_cached(self.ln_1(x), cache, start)
        return x + self.mlp(self.ln_2(x))

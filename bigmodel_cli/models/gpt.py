from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from bigmodel_cli.models.attention import Block, LayerCache
from bigmodel_cli.models.description import PipelineStages, TransformerBlocks, TransformerFlops
from bigmodel_cli.models.gpt2_names import gpt2_config, gpt2_weights


class KVCache:
    """The keys and values of the `length` tokens a GPT has seen so far, every layer's, with
    room for block_size tokens: each new token then costs one position, not the whole context."""

    def __init__(self, layers: List[LayerCache]):
        self.layers = layers
        self.length = 0


class GPT(nn.Module):
    """Decoder-only causal language model in the GPT-2 mould.

    Token + learned position embeddings, pre-LN causal blocks on SDPA, a final LayerNorm
    and an LM head that shares its weight with the token embedding. Returns logits
    shaped (B, T, vocab_size). For sampling, `new_kv_cache` and `forward_cached` feed the
    tokens one at a time after the prompt (the training forward does not use them).
    """

    input_kinds = ("tokens",)
    tensor_parallel = TransformerBlocks(heads_key="n_head", width_key="n_embd")
    # Token + position embeddings before the blocks; the final norm and the (tied) head after.
    pipeline_stages = PipelineStages("blocks", ("tok_emb", "pos_emb"), ("ln_f", "lm_head"), "n_layer")
    flops = TransformerFlops("n_layer", "n_embd", positions="pos_emb")

    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4,
                 n_embd: int = 128, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(n_embd, n_head, 4, dropout, bias, causal=True) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer).
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size={self.block_size}")
        x = self.stage_input(idx)
        for block in self.blocks:
            x = block(x)
        return self.stage_output(x)

    def stage_input(self, idx: torch.Tensor) -> torch.Tensor:
        """What the first block reads: token + position embeddings (dropped out)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.dropout(self.tok_emb(idx) + self.pos_emb(pos))

    def stage_output(self, x: torch.Tensor) -> torch.Tensor:
        """The logits, from the last block's output."""
        return self.lm_head(self.ln_f(x))

    def as_gpt2(self) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
        """This model as Hugging Face's GPT2LMHeadModel: GPT2Config's keyword arguments and the
        weights by GPT-2's names (models/gpt2_names.py; `bigmodel export format=hf`)."""
        return gpt2_config(self), gpt2_weights(self)

    def new_kv_cache(self, batch_size: int) -> KVCache:
        """An empty cache for `batch_size` sequences of up to block_size tokens."""
        attn = self.blocks[0].attn
        head_dim = self.pos_emb.embedding_dim // attn.n_heads
        like = self.pos_emb.weight
        return KVCache([LayerCache(batch_size, attn.n_heads, self.block_size, head_dim, like)
                        for _ in self.blocks])

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, t, vocab) of the tokens `idx` (B, t) that follow the cache's tokens, at
        the positions after them; their keys and values join the cache. Inference only (no
        dropout, no gradients)."""
        start, t = cache.length, idx.shape[1]
        if start + t > self.block_size:
            raise ValueError(f"{start} cached + {t} new tokens is longer than block_size={self.block_size}")
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block, layer in zip(self.blocks, cache.layers):
            x = block.forward_cached(x, layer, start)
        cache.length = start + t
        return self.lm_head(self.ln_f(x))

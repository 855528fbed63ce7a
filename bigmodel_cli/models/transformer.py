from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from bigmodel_cli.models.attention import Block
from bigmodel_cli.models.description import PipelineStages, TransformerBlocks
from bigmodel_cli.models.rnn import as_sequence, sequence_shape


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention Is All You Need", shaped (1, length, dim)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table[None]


class TransformerEncoder(nn.Module):
    """Pre-LN encoder with a [CLS] token and a classification (or regression) head.

    Images are read as a sequence of rows, or of square patches when `patch_size` is set.
    `forward(x, padding_mask)` takes an optional (B, T) mask, True at padded steps.
    """

    input_kinds = ("sequence", "image", "vector")
    tensor_parallel = TransformerBlocks(heads_key="n_heads", width_key="d_model")
    # The input projection, [CLS] token and positions before the blocks; norm and head after.
    pipeline_stages = PipelineStages("blocks", ("embed", "cls_token", "pos"), ("ln_f", "head"), "n_layers")

    def __init__(self, input_shape: Sequence[int], num_outputs: int, d_model: int = 64,
                 n_heads: int = 4, n_layers: int = 2, mlp_ratio: int = 4, dropout: float = 0.1,
                 positional: str = "learned", patch_size: Optional[int] = None):
        super().__init__()
        self.patch_size = patch_size
        if patch_size is not None:
            if len(input_shape) != 3:
                raise ValueError("patch_size applies to images (C, H, W) only")
            c, h, w = input_shape
            if h % patch_size or w % patch_size:
                raise ValueError(f"image {h}x{w} does not divide into {patch_size}x{patch_size} patches")
            steps, features = (h // patch_size) * (w // patch_size), c * patch_size * patch_size
        else:
            steps, features = sequence_shape(input_shape)
        self.embed = nn.Linear(features, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        if positional == "learned":
            self.pos = nn.Parameter(torch.randn(1, steps + 1, d_model) * 0.02)
        elif positional == "sinusoidal":
            self.register_buffer("pos", sinusoidal_positions(steps + 1, d_model), persistent=False)
        else:
            raise ValueError(f"unknown positional '{positional}'; choose learned or sinusoidal")
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs)

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if p is None:
            return as_sequence(x)
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(b, (h // p) * (w // p), c * p * p)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.stage_input(x)
        if padding_mask is not None:  # the [CLS] token is never padding
            padding_mask = torch.cat([padding_mask.new_zeros(h.shape[0], 1), padding_mask], dim=1)
        for block in self.blocks:
            h = block(h, key_padding_mask=padding_mask)
        return self.stage_output(h)

    def stage_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the first block reads: the embedded sequence after a [CLS] token, with positions."""
        h = self.embed(self.to_sequence(x))
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        return self.dropout(h + self.pos[:, : h.shape[1]])

    def stage_output(self, h: torch.Tensor) -> torch.Tensor:
        """The prediction, from the last block's output at the [CLS] token."""
        return self.head(self.ln_f(h[:, 0]))

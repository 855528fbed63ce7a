from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class CNN(nn.Module):
    """Conv blocks (conv, batch norm, ReLU, 2x2 max-pool) and a classifier head.

    Sized for small images such as 8x8 digits: a block pools only while the feature
    map is at least 2 pixels on each side.
    """

    input_kinds = ("image",)

    def __init__(self, input_shape: Sequence[int], num_outputs: int,
                 channels: Sequence[int] = (32, 64), kernel_size: int = 3,
                 batch_norm: bool = True, hidden_size: int = 128, dropout: float = 0.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"CNN needs images shaped (C, H, W), got {tuple(input_shape)}")
        in_ch, h, w = input_shape
        blocks: list[nn.Module] = []
        for out_ch in channels:
            blocks += [nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=not batch_norm)]
            if batch_norm:
                blocks.append(nn.BatchNorm2d(out_ch))
            blocks.append(nn.ReLU())
            if h >= 2 and w >= 2:
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_ch * h * w, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

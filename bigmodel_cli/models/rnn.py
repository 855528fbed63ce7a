from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, F) -> (B, F, 1); (B, T, F) as is; (B, C, H, W) -> rows: (B, H, C*W)."""
    if x.dim() == 2:
        return x.unsqueeze(-1)
    if x.dim() == 4:
        b, c, h, w = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, h, c * w)
    return x


def sequence_shape(input_shape: Sequence[int]) -> tuple[int, int]:
    """(steps, features) that `as_sequence` produces for one sample of this shape."""
    if len(input_shape) == 1:
        return input_shape[0], 1
    if len(input_shape) == 3:
        c, h, w = input_shape
        return h, c * w
    return input_shape[0], input_shape[1]


class RNN(nn.Module):
    """Vanilla RNN, LSTM or GRU over a sequence; a linear head on the last state.

    Serves sequence classification (images read row by row) and sequence regression
    (predict the next value of a time series).
    """

    input_kinds = ("sequence", "image", "vector")

    def __init__(self, input_shape: Sequence[int], num_outputs: int, cell: str = "lstm",
                 hidden_size: int = 128, num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell '{cell}'; choose one of {', '.join(CELLS)}")
        _, features = sequence_shape(input_shape)
        self.rnn = CELLS[cell](features, hidden_size, num_layers=num_layers, batch_first=True,
                               bidirectional=bidirectional,
                               dropout=dropout if num_layers > 1 else 0.0)
        self.directions = 2 if bidirectional else 1
        self.head = nn.Linear(hidden_size * self.directions, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(as_sequence(x))
        h_n = state[0] if isinstance(state, tuple) else state  # LSTM also returns c_n
        # Final state of the last layer, both directions: (B, H * directions).
        last = h_n[-self.directions:].transpose(0, 1).reshape(x.shape[0], -1)
        return self.head(last)

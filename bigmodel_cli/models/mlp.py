from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bigmodel_cli.models.description import LinearPairs

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """Stacked Linear + activation (+ dropout): h = f(W x + b), then a linear head."""

    input_kinds = ("vector", "sequence", "image")
    tensor_parallel = LinearPairs(container="net", widths_key="hidden_sizes")

    def __init__(self, input_shape: Sequence[int], num_outputs: int,
                 hidden_sizes: Sequence[int] = (256, 128), activation: str = "relu",
                 dropout: float = 0.0):
        super().__init__()
        in_features = 1
        for d in input_shape:
            in_features *= d
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden_sizes:
            layers += [nn.Linear(in_features, width), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = width
        layers.append(nn.Linear(in_features, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

"""A user model whose output turns non-finite in one training forward pass (the `at`-th),
as a bad batch or an overflow would, for the non-finite handling tests; or whose forward
raises an unexpected error (the `raise_at`-th), as a bug in a user's model would."""

import torch
from torch import nn


class NonFiniteAt(nn.Module):
    def __init__(self, input_shape, num_outputs, at: int = 3, raise_at: int = -1):
        super().__init__()
        features = 1
        for d in input_shape:
            features *= d
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, num_outputs))
        self.at, self.raise_at = at, raise_at
        self.training_calls = 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.training_calls += 1
            if self.training_calls == self.at:
                out = out * torch.tensor(float("nan"))
            if self.training_calls == self.raise_at:
                raise ZeroDivisionError("raised on purpose")
        return out

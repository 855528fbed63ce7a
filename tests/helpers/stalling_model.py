"""A user model for the timeout test: rank 1 stalls in its 3rd forward, so rank 0 waits in
a collective that must time out rather than hang."""

import os
import time

from torch import nn


class StallOnRank1(nn.Module):
    def __init__(self, input_shape, num_outputs, stall_s: float = 120.0):
        super().__init__()
        features = 1
        for d in input_shape:
            features *= d
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(features, num_outputs))
        self.stall_s = stall_s
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.training and self.calls == 3 and os.environ.get("RANK") == "1":
            time.sleep(self.stall_s)
        return self.net(x)

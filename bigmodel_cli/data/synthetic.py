from __future__ import annotations

import math
from typing import Sequence

import torch

from bigmodel_cli.data.base import DataModule, DataSpec, input_kind_of, split_tensors
from bigmodel_cli.errors import UserError


class Synthetic(DataModule):
    """Generated data of any size and shape, for tests and benchmarks.

    classification: Gaussian clusters, one random centre per class, `noise` their spread.
    regression: y = <w, x> + noise with a random w (one target).
    Everything is drawn from `seed`, so a config always gives the same data.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, task: str = "classification",
                 num_samples: int = 4096, input_shape: Sequence[int] = (32,), num_classes: int = 4,
                 noise: float = 1.0, val_fraction: float = 0.1, test_fraction: float = 0.1):
        super().__init__(batch_size)
        self.seed, self.task = seed, task
        self.num_samples, self.input_shape = num_samples, tuple(input_shape)
        self.num_classes, self.noise = num_classes, noise
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        if not 1 <= len(self.input_shape) <= 3 or min(self.input_shape) < 1:
            raise UserError(f"data.input_shape={list(self.input_shape)} must be [F], [T, F] or "
                            "[C, H, W] with positive sizes")
        if task not in ("classification", "regression"):
            raise UserError(f"data.task={task} is not a task; use classification or regression")
        if num_samples < 1:
            raise UserError(f"data.num_samples must be > 0 (got {num_samples})")
        if self.task == "classification" and num_classes < 2:
            raise UserError(f"data.num_classes must be >= 2 (got {num_classes})")

    def setup(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        n, shape = self.num_samples, self.input_shape
        if self.task == "classification":
            # Centres ~3 apart whatever the dimension: noise=1 gives an imperfect but learnable task.
            centres = torch.randn((self.num_classes, *shape), generator=gen) * (2.0 / math.prod(shape) ** 0.5)
            y = torch.randint(0, self.num_classes, (n,), generator=gen)
            x = centres[y] + self.noise * torch.randn((n, *shape), generator=gen)
            outputs = self.num_classes
        else:
            w = torch.randn(shape, generator=gen)
            x = torch.randn((n, *shape), generator=gen)
            y = (x * w).flatten(1).sum(1, keepdim=True) / w.numel() ** 0.5
            y = y + self.noise * 0.1 * torch.randn((n, 1), generator=gen)
            outputs = 1
        self.splits = split_tensors(x, y, self.val_fraction, self.test_fraction)
        self._spec = DataSpec(self.task, input_kind_of(shape), shape, outputs)

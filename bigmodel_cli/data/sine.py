from __future__ import annotations

import math

import torch

from bigmodel_cli.data.base import DataModule, DataSpec, split_tensors


class Sine(DataModule):
    """Noisy sine waves: from a window of `seq_len` values, predict the next one (MSE).

    Each sample has its own frequency, phase and amplitude, so a model must read the
    window rather than memorise one curve.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, num_samples: int = 4096,
                 seq_len: int = 32, noise: float = 0.05, val_fraction: float = 0.1,
                 test_fraction: float = 0.1):
        super().__init__(batch_size)
        self.seed = seed
        self.num_samples, self.seq_len, self.noise = num_samples, seq_len, noise
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def setup(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        n, t = self.num_samples, self.seq_len
        freq = 0.05 + 0.25 * torch.rand((n, 1), generator=gen)  # radians per step
        phase = 2 * math.pi * torch.rand((n, 1), generator=gen)
        amp = 0.5 + torch.rand((n, 1), generator=gen)
        steps = torch.arange(t + 1, dtype=torch.float32)[None]
        wave = amp * torch.sin(freq * steps + phase)
        wave = wave + self.noise * torch.randn(wave.shape, generator=gen)
        x, y = wave[:, :t, None], wave[:, t:]
        self.splits = split_tensors(x, y, self.val_fraction, self.test_fraction)
        self._spec = DataSpec("regression", "sequence", (t, 1), 1)

from __future__ import annotations

import torch

from bigmodel_cli.data.base import DataModule, DataSpec, split_tensors
from bigmodel_cli.errors import UserError


def load_digits_arrays():
    """The 1,797 8x8 handwritten digits (UCI) that scikit-learn ships offline."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a core dependency
        raise UserError("data=digits needs scikit-learn: pip install scikit-learn") from err
    bunch = load_digits()
    return bunch.data, bunch.target


class Digits(DataModule):
    """8x8 grey-scale digits as (1, 8, 8) images, 10 classes, standardised.

    The train/val/test split is a fixed permutation drawn from `seed`; the mean and
    standard deviation come from the training split only.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2):
        super().__init__(batch_size)
        self.seed = seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def setup(self) -> None:
        data, target = load_digits_arrays()
        x = torch.as_tensor(data, dtype=torch.float32).reshape(-1, 1, 8, 8)
        y = torch.as_tensor(target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        splits = split_tensors(x[order], y[order], self.val_fraction, self.test_fraction)
        train_x = splits["train"][0]
        mean, std = train_x.mean(), train_x.std()
        self.splits = {name: ((sx - mean) / std, sy) for name, (sx, sy) in splits.items()}
        self._spec = DataSpec("classification", "image", (1, 8, 8), 10)

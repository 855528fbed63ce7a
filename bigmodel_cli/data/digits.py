from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy
import torch

from bigmodel_cli.data.base import DataModule, DataSpec, split_tensors
from bigmodel_cli.errors import UserError


def load_digits_arrays():
    """The 1,797 8x8 handwritten digits (UCI) that scikit-learn ships offline, read from its
    data file: importing sklearn.datasets would cost about 2 s of every run's start-up."""
    spec = importlib.util.find_spec("sklearn")  # where it is installed; nothing of it runs
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data=digits needs scikit-learn: pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():  # a scikit-learn that keeps it elsewhere: its own loader
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data, bunch.target
    return read_digits_file(path)


def read_digits_file(path: Path):
    """(pixels, digits) from scikit-learn's digits.csv.gz: 64 pixel values and the digit per
    row. A damaged file is one line naming it, not a numpy traceback."""
    try:
        table = numpy.loadtxt(path, delimiter=",", ndmin=2)
    except (OSError, EOFError, ValueError) as err:
        raise UserError(f"scikit-learn's digits file {path} cannot be read ({type(err).__name__}: {err}); "
                        "reinstall it: pip install --force-reinstall scikit-learn") from None
    if table.shape[1] != 65 or not len(table):
        raise UserError(f"scikit-learn's digits file {path} holds {table.shape} numbers, not rows of 64 pixels "
                        "and a digit; reinstall it: pip install --force-reinstall scikit-learn")
    return table[:, :-1], table[:, -1].astype(int)


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

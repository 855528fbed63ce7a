"""What every data set provides: a `DataSpec`, splits, and batch iterators.

Batches are cut from whole tensors by index (one gather per batch), never assembled
sample by sample in Python, so loading is never the bottleneck for in-memory data.
Shuffling is a pure function of (seed, epoch): a position in the stream is just
(epoch, batch index), which is what exact resume needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch

from bigmodel_cli.errors import UserError

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data, and what the loss must be."""

    task: str  # "classification" | "regression" | "language_modeling"
    input_kind: str  # "vector" | "sequence" | "image" | "tokens"
    input_shape: Tuple[int, ...]
    num_outputs: int  # classes, regression targets, or vocabulary size
    vocab_size: Optional[int] = None
    block_size: Optional[int] = None

    def model_kwargs(self) -> Dict[str, object]:
        """Sizes offered to a model constructor; it takes the ones it names."""
        kwargs: Dict[str, object] = {"input_shape": self.input_shape, "num_outputs": self.num_outputs}
        if self.vocab_size is not None:
            kwargs["vocab_size"] = self.vocab_size
        if self.block_size is not None:
            kwargs["block_size"] = self.block_size
        return kwargs


def input_kind_of(shape: Tuple[int, ...]) -> str:
    return {1: "vector", 2: "sequence", 3: "image"}[len(shape)]


def split_tensors(x: torch.Tensor, y: torch.Tensor, val_fraction: float,
                  test_fraction: float) -> Dict[str, Batch]:
    """Consecutive train / val / test slices (shuffle first if the order means anything)."""
    n = len(x)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise UserError(f"{n} samples are too few to split into train/val/test "
                        f"with val_fraction={val_fraction}, test_fraction={test_fraction}")
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    return {name: (x[a:b], y[a:b]) for name, (a, b) in bounds.items()}


def check_split(name: str, available) -> None:
    if name not in available:
        raise UserError(f"unknown split '{name}'; choose one of {', '.join(available)}")


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's share of epoch `epoch`'s permutation of `n` samples: a pure function of
    (seed, epoch), strided across ranks so the shares are disjoint."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)[rank::world_size]


class ShuffledBatches:
    """Full batches of (x[idx], y[idx]) in a fresh permutation each epoch.

    The permutation depends only on (seed, epoch); `rank`/`world_size` take a disjoint
    strided share of it. The last partial batch is dropped so every step sees
    `batch_size` samples.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.x, self.y = x, y
        self.batch_size = min(batch_size, len(x) // world_size)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields epoch `epoch` from its batch `start` (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (len(self.x) // self.world_size) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        order = epoch_order(len(self.x), self.seed, self.epoch, self.rank, self.world_size).to(self.x.device)
        for i in range(self.start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            # index_select copies whole rows; x[idx] (advanced indexing) is ~5x slower here.
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


class SequentialBatches:
    """Every sample once, in order, in batches (the last one may be short).

    With `world_size` > 1 each rank takes a disjoint strided share, without padding, so
    the ranks' summed metrics count every sample exactly once.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
        self.x, self.y, self.batch_size = x[rank::world_size], y[rank::world_size], batch_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.x), self.batch_size):
            yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]


class DataModule:
    """Base for data sets. Subclasses implement `setup` and fill `self.splits`."""

    #: what one sample counts for in throughput figures ("samples" or "tokens")
    unit = "samples"
    #: bumped when the same seed starts drawing different training batches: a checkpoint
    #: of another version resumes, but not bit for bit (the resume says so)
    sampler_version = 1

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.splits: Dict[str, Batch] = {}
        self._spec: Optional[DataSpec] = None

    # ---- to implement
    def setup(self) -> None:
        raise NotImplementedError

    # ---- shared
    @property
    def spec(self) -> DataSpec:
        if self._spec is None:
            raise RuntimeError("call setup() before reading the spec")
        return self._spec

    def state_dict(self) -> dict:
        """What must travel with a checkpoint to rebuild this data (e.g. a vocabulary)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def to(self, device: torch.device) -> "DataModule":
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}
        return self

    def train_batches(self, seed: int, rank: int = 0, world_size: int = 1):
        x, y = self.splits["train"]
        return ShuffledBatches(x, y, self.batch_size, seed, rank, world_size)

    def eval_batches(self, split: str, batch_size: Optional[int] = None, rank: int = 0, world_size: int = 1):
        check_split(split, self.splits)
        x, y = self.splits[split]
        return SequentialBatches(x, y, batch_size or self.batch_size, rank, world_size)

    def units_per_sample(self) -> int:
        return 1

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(x):,}" for k, (x, _) in self.splits.items())
        return f"{type(self).__name__}: {sizes} {self.unit}; task {self.spec.task}"

"""Batches from a map-style torch Dataset, through torch's DataLoader.

The order is the one in-memory data uses (data/base.py): each epoch a permutation drawn
from (seed, epoch) alone, each rank a disjoint strided share of it, full batches only. The
DataLoader is only told which indices make each batch, so samples are read (and images
decoded) in its worker processes and collated there with torch's default collate; the
position in the stream is still (epoch, batch index), which exact resume restores.

The DataLoader draws its workers' base seed from a generator of its own, never from the
global RNG, which would shift the training run's dropout after a resume.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator, List, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from bigmodel_cli.data.base import Batch, epoch_order
from bigmodel_cli.errors import UserError

#: checks (and fixes) one collated batch on the host, before it goes to the device
BatchCheck = Callable[[torch.Tensor, torch.Tensor], Batch]


class Reading(NamedTuple):
    """How batches are read: the same for every split of one data set."""

    num_workers: int
    device: torch.device
    check: BatchCheck
    source: str  # names the data in errors, e.g. "mypkg.make_dataset"
    hint: str  # the fix offered when reading a batch fails


class EpochBatchIndices:
    """The DataLoader's batch sampler: this rank's batches of one epoch, from a start batch."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.batch_size = min(batch_size, n // world_size)
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return (self.n // self.world_size) // self.batch_size if self.batch_size else 0

    def __iter__(self) -> Iterator[List[int]]:
        order = epoch_order(self.n, self.seed, self.epoch, self.rank, self.world_size).tolist()
        for i in range(self.start, len(self)):
            yield order[i * self.batch_size:(i + 1) * self.batch_size]


def collate_pair(samples: Sequence) -> Batch:
    """torch's default collate of (x, y) samples, with float64 (NumPy's and Python's
    default) made float32, which the models compute in."""
    x, y = default_collate(samples)
    x = x.float() if x.dtype == torch.float64 else x
    y = y.float() if y.dtype == torch.float64 else y
    return x, y


def make_loader(dataset: Dataset, num_workers: int, device: torch.device, seed: int, persistent: bool,
                **batching) -> DataLoader:
    # Workers are forked on Linux: the ranks are spawned, so they would otherwise spawn their
    # workers too, and each would import torch again (seconds, at every evaluation).
    context = "fork" if num_workers > 0 and sys.platform.startswith("linux") else None
    return DataLoader(dataset, num_workers=num_workers, collate_fn=collate_pair, multiprocessing_context=context,
                      pin_memory=device.type == "cuda", persistent_workers=persistent and num_workers > 0,
                      generator=torch.Generator().manual_seed(seed), **batching)


class DatasetBatches:
    """Batches of a DataLoader, checked on the host and copied to `device` (non-blocking
    from pinned memory on CUDA). A failure inside the user's Dataset, or samples that do
    not collate, ends the run with one line naming `source`."""

    def __init__(self, loader: DataLoader, reading: Reading):
        self.loader, self.reading = loader, reading

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        while True:
            try:
                x, y = next(batches)
            except StopIteration:
                return
            except Exception as err:  # the user's __getitem__, a damaged file, samples that do not stack
                raise UserError(f"reading a batch from {self.reading.source} failed ({reason(err)}); "
                                f"{self.reading.hint}") from None
            x, y = self.reading.check(x, y)
            device = self.reading.device
            yield x.to(device, non_blocking=device.type == "cuda"), y.to(device, non_blocking=device.type == "cuda")


class TrainBatches(DatasetBatches):
    """This rank's training batches, epoch after epoch (set_epoch picks the epoch and the
    batch to start from); the workers live as long as the loader."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int,
                 reading: Reading):
        self.indices = EpochBatchIndices(len(dataset), batch_size, seed, rank, world_size)
        loader = make_loader(dataset, reading.num_workers, reading.device, seed, persistent=True,
                             batch_sampler=self.indices)
        super().__init__(loader, reading)
        self.batch_size = self.indices.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.indices.epoch, self.indices.start = epoch, start


def eval_batches(dataset: Dataset, batch_size: int, rank: int, world_size: int, reading: Reading) -> DatasetBatches:
    """Every sample once, in order; with several ranks each takes a disjoint strided share
    (no padding, so summed metrics count each sample once). The last batch may be short."""
    indices = range(rank, len(dataset), world_size)
    batches = -(-len(indices) // batch_size)
    workers = reading.num_workers if batches > 1 else 0  # one batch (a model check): not worth a process
    loader = make_loader(dataset, workers, reading.device, 0, persistent=False, batch_size=batch_size,
                         sampler=indices, shuffle=False)
    return DatasetBatches(loader, reading)


def reason(err: BaseException) -> str:
    """`Type: message` of an exception, looking through the DataLoader's wrapper of one
    raised in a worker ("Caught X in DataLoader worker process 0 ... Original Traceback")."""
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and len(lines) > 1:
        return lines[-1][:200]  # the original exception's last line, "Type: message"
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


"""Batches of language-model windows, for both token data sets (data/text.py keeps its
tokens in memory, data/tokens.py memory-maps them): block_size + 1 consecutive tokens
each, x the first block_size and y the same shifted by one.

Windows are gathered on the host (one fancy index per batch, no Python per sample) and
copied to the device as one tensor, from pinned memory on CUDA, so the copy never blocks
the host. Ids are checked against the vocabulary on the way.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from bigmodel_cli.data.base import Batch
from bigmodel_cli.errors import UserError


def gather_windows(tokens: np.ndarray, index: np.ndarray, vocab_size: Optional[int], source: str) -> torch.Tensor:
    """tokens[index] as int64, refusing ids the model has no embedding for. Checked on the
    host per batch (a max over a few thousand ids), so an unchecked id never reaches the
    device, where it would be an opaque index error or a device-side assert."""
    window = tokens[index]
    if vocab_size is not None and window.size and int(window.max()) >= vocab_size:
        raise token_out_of_range(int(window.max()), vocab_size, source)
    return torch.from_numpy(window.astype(np.int64))


def token_out_of_range(token: int, vocab_size: int, source: str) -> UserError:
    return UserError(f"{source} holds token id {token:,}, but the vocabulary has {vocab_size:,} ids; set "
                     f"data.vocab_size to at least {token + 1:,} (GPT-2 tokens: 50304), or prepare the data "
                     "again with bigmodel prepare")


class RandomWindows:
    """`batch_size` random windows of block_size + 1 tokens per batch.

    Batch i of an epoch draws its offsets from a generator seeded by (seed, epoch, rank, i),
    so any batch can be produced directly: resuming mid-epoch costs nothing, and nothing
    per epoch is held in memory however large the file.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, device: torch.device = torch.device("cpu"),
                 vocab_size: Optional[int] = None, source: str = "the tokens"):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.vocab_size, self.source = vocab_size, source
        self.epoch, self.start = 0, 0
        self._window = np.arange(block_size + 1, dtype=np.int64)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(1, len(self.tokens) // (self.block_size * self.batch_size * self.world_size))

    def host_window(self, i: int) -> torch.Tensor:
        """Batch i's windows on the host, (batch, block_size + 1), pinned when bound for CUDA."""
        seed = ((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank) * 1_000_033 + i
        gen = torch.Generator().manual_seed(seed % (2**63))
        high = len(self.tokens) - self.block_size - 1
        starts = torch.randint(0, high + 1, (self.batch_size,), generator=gen).numpy()
        window = gather_windows(self.tokens, starts[:, None] + self._window, self.vocab_size, self.source)
        return window.pin_memory() if self.device.type == "cuda" else window

    def host_windows(self) -> Iterator[torch.Tensor]:
        """This epoch's host windows from the current position (the part a prefetch thread runs)."""
        for i in range(self.start, len(self)):
            yield self.host_window(i)

    def finish(self, window: torch.Tensor) -> Batch:
        """To the device and split into inputs and targets. Called from the training thread, so
        the copy is queued on its stream; from pinned memory it does not block the host."""
        window = window.to(self.device, non_blocking=True)
        return window[:, :-1], window[:, 1:]

    def __iter__(self) -> Iterator[Batch]:
        for window in self.host_windows():
            yield self.finish(window)


class SequentialWindows:
    """Non-overlapping windows covering the split once, in order (for evaluation); with
    `world_size` > 1 each rank takes every world_size-th window, without padding."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, device: torch.device = torch.device("cpu"),
                 vocab_size: Optional[int] = None, source: str = "the tokens"):
        self.tokens, self.block_size, self.batch_size, self.device = tokens, block_size, batch_size, device
        self.vocab_size, self.source = vocab_size, source
        self.window_ids = range(rank, (len(tokens) - 1) // block_size, world_size)
        self._window = np.arange(block_size + 1, dtype=np.int64)

    def __len__(self) -> int:
        return -(-len(self.window_ids) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for first in range(0, len(self.window_ids), self.batch_size):
            ids = np.asarray(self.window_ids[first:first + self.batch_size], dtype=np.int64)
            window = gather_windows(self.tokens, ids[:, None] * self.block_size + self._window, self.vocab_size,
                                    self.source)
            window = window.to(self.device, non_blocking=self.device.type == "cuda")
            yield window[:, :-1], window[:, 1:]

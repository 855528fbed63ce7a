from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from bigmodel_cli.data.base import Batch, DataModule, DataSpec, check_split
from bigmodel_cli.data.tokenizers import vocabulary_problem
from bigmodel_cli.errors import UserError


def builtin_corpus() -> str:
    """Python's own documentation topics (~465k characters), shipped with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_corpus(path: str) -> str:
    """One UTF-8 file, or every file below a folder in sorted order, joined."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"data.path={path} does not exist; point it at a UTF-8 text file or folder")
    if root.is_dir():  # every file below it, skipping hidden ones (.git, .DS_Store)
        files = sorted(f for f in root.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(root).parts))
    else:
        files = [root]
    if not files:
        raise UserError(f"data.path={path} is a folder with no files in it")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise UserError(f"{f} is not UTF-8 text ({err.reason} at byte {err.start}); "
                            "convert it or leave it out of data.path") from None
    return "\n".join(texts)


def encode(text: str, vocab: List[str]) -> torch.Tensor:
    """Characters -> vocabulary ids, vectorised (no Python loop over the characters)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    points = np.array([ord(ch) for ch in vocab], dtype=np.uint32)
    order = np.argsort(points)
    pos = np.minimum(np.searchsorted(points[order], codes), len(points) - 1)
    known = points[order][pos] == codes
    if not known.all():
        unknown = sorted(set(chr(c) for c in codes[~known].tolist()))
        raise UserError(f"the text has {len(unknown)} characters outside the model's vocabulary "
                        f"({''.join(unknown[:20])!r}); use text in the alphabet the model was trained on")
    ids = order[pos]
    return torch.from_numpy(ids.astype(np.int64))


class RandomWindows:
    """`batch_size` random windows of block_size + 1 tokens per batch (x, and y shifted by one).

    Offsets come from a generator seeded by (seed, epoch, rank); an "epoch" is as many
    batches as it takes to cover this rank's share of the tokens once.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0
        self._window = torch.arange(block_size + 1, device=tokens.device)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields epoch `epoch` from its batch `start` (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(1, len(self.tokens) // (self.block_size * self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[Batch]:
        seed = (self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank
        gen = torch.Generator().manual_seed(seed)
        high = len(self.tokens) - self.block_size - 1
        # All of the epoch's offsets in one host-to-device copy, not one copy per step.
        starts = torch.randint(0, high + 1, (len(self), self.batch_size), generator=gen)
        starts = starts.to(self.tokens.device)
        for i in range(self.start, len(self)):
            window = self.tokens[starts[i, :, None] + self._window]
            yield window[:, :-1], window[:, 1:]


class SequentialWindows:
    """Non-overlapping windows covering the split once, in order (for evaluation); with
    `world_size` > 1 each rank takes every world_size-th window, without padding."""

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.window_ids = torch.arange((len(tokens) - 1) // block_size, device=tokens.device)[rank::world_size]

    def __len__(self) -> int:
        return -(-len(self.window_ids) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        window = torch.arange(self.block_size + 1, device=self.tokens.device)
        for first in range(0, len(self.window_ids), self.batch_size):
            starts = self.window_ids[first:first + self.batch_size] * self.block_size
            w = self.tokens[starts[:, None] + window]
            yield w[:, :-1], w[:, 1:]


class CharText(DataModule):
    """Character-level language modelling on a UTF-8 file or folder.

    The vocabulary is every character of the corpus, sorted; it is saved with the run
    and restored from a checkpoint, so ids mean the same thing at eval time. Splits are
    contiguous: the first part trains, then val, then test.
    """

    unit = "tokens"

    def __init__(self, batch_size: int = 12, path: Optional[str] = None, block_size: int = 64,
                 val_fraction: float = 0.05, test_fraction: float = 0.05):
        super().__init__(batch_size)
        if path is not None and not str(path).strip():
            raise UserError("data.path is empty; give a UTF-8 file or folder, or data.path=null "
                            "for the built-in corpus")
        self.path, self.block_size = path, block_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.vocab: Optional[List[str]] = None
        self.tokens: Dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict:
        return {"vocab": self.vocab}

    def load_state_dict(self, state: dict) -> None:
        vocab = state.get("vocab")
        problem = vocabulary_problem(vocab) if vocab is not None else None
        if problem:
            raise UserError(f"the stored vocabulary is broken ({problem}); use another checkpoint")
        self.vocab = vocab

    def setup(self) -> None:
        text = builtin_corpus() if self.path is None else read_corpus(self.path)
        if self.vocab is None:
            self.vocab = sorted(set(text))
        ids = encode(text, self.vocab)
        n = len(ids)
        n_val, n_test = int(n * self.val_fraction), int(n * self.test_fraction)
        n_train = n - n_val - n_test
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        self.tokens = {k: ids[a:b] for k, (a, b) in bounds.items()}
        short = [k for k, t in self.tokens.items() if len(t) < self.block_size + 2]
        if short:
            raise UserError(f"the {', '.join(short)} split has fewer than block_size+2={self.block_size + 2} "
                            f"characters ({n:,} in all); use more text or a smaller data.block_size")
        self._spec = DataSpec("language_modeling", "tokens", (self.block_size,), len(self.vocab),
                              vocab_size=len(self.vocab), block_size=self.block_size)

    def to(self, device: torch.device) -> "CharText":
        self.tokens = {k: t.to(device) for k, t in self.tokens.items()}
        return self

    def train_batches(self, seed: int, rank: int = 0, world_size: int = 1):
        return RandomWindows(self.tokens["train"], self.block_size, self.batch_size, seed, rank, world_size)

    def eval_batches(self, split: str, batch_size: Optional[int] = None, rank: int = 0, world_size: int = 1):
        check_split(split, self.tokens)
        return SequentialWindows(self.tokens[split], self.block_size, batch_size or self.batch_size,
                                 rank, world_size)

    def units_per_sample(self) -> int:
        return self.block_size

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(t):,}" for k, t in self.tokens.items())
        source = self.path or "Python's built-in docs"
        return f"CharText ({source}): {sizes} characters; vocabulary {len(self.vocab)}"

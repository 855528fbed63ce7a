from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from bigmodel_cli.data.base import DataModule, DataSpec, check_split
from bigmodel_cli.data.tokenizers import encode, vocabulary_problem
from bigmodel_cli.data.windows import RandomWindows, SequentialWindows
from bigmodel_cli.engine.files import user_path
from bigmodel_cli.errors import UserError


def builtin_corpus() -> str:
    """Python's own documentation topics (~465k characters), shipped with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_corpus(path: str) -> str:
    """One UTF-8 file, or every file below a folder in sorted order, joined."""
    root = user_path(path)
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


class CharText(DataModule):
    """Character-level language modelling on a UTF-8 file or folder.

    The vocabulary is every character of the corpus, sorted; it is saved with the run
    and restored from a checkpoint, so ids mean the same thing at eval time. Splits are
    contiguous: the first part trains, then val, then test.
    """

    unit = "tokens"
    sampler_version = 2  # 2: windows drawn per batch (data/windows.py), as for token files

    def __init__(self, batch_size: int = 12, path: Optional[str] = None, block_size: int = 64,
                 val_fraction: float = 0.05, test_fraction: float = 0.05):
        super().__init__(batch_size)
        if path is not None and not str(path).strip():
            raise UserError("data.path is empty; give a UTF-8 file or folder, or data.path=null "
                            "for the built-in corpus")
        self.path, self.block_size = path, block_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.vocab: Optional[List[str]] = None
        self.tokens: Dict[str, np.ndarray] = {}  # on the host; batches go to `device`
        self.device = torch.device("cpu")

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
        self.device = device  # the tokens stay on the host; each batch is copied over on its own
        return self

    def train_batches(self, seed: int, rank: int = 0, world_size: int = 1):
        return RandomWindows(self.tokens["train"], self.block_size, self.batch_size, seed, rank, world_size,
                             self.device)

    def eval_batches(self, split: str, batch_size: Optional[int] = None, rank: int = 0, world_size: int = 1):
        check_split(split, self.tokens)
        return SequentialWindows(self.tokens[split], self.block_size, batch_size or self.batch_size,
                                 rank, world_size, self.device)

    def units_per_sample(self) -> int:
        return self.block_size

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(t):,}" for k, t in self.tokens.items())
        source = self.path or "Python's built-in docs"
        return f"CharText ({source}): {sizes} characters; vocabulary {len(self.vocab)}"

"""`data=tokens`: language modelling on prepared token files, memory-mapped.

A data dir holds `train.bin` and `val.bin` (optionally `test.bin`): flat arrays of token
ids, uint16 when the vocabulary fits, else uint32, the layout nanoGPT-style tools write,
plus our `meta.json` (dtype, vocabulary size, tokenizer) from `bigmodel prepare`, or
nanoGPT's own `meta.pkl` (read as data only: data/nanogpt_meta.py). The files are never
read whole: each batch gathers its windows from the memory map, so they
may be larger than RAM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from bigmodel_cli.data.base import DataModule, DataSpec, check_split
from bigmodel_cli.data.nanogpt_meta import META_PKL, read_meta_pkl
from bigmodel_cli.data.prefetch import Prefetched
from bigmodel_cli.data.tokenizers import tokenizer_problem
from bigmodel_cli.data.windows import (
    RandomWindows,
    SequentialWindows,
    token_out_of_range,
)
from bigmodel_cli.engine.files import user_path
from bigmodel_cli.errors import UserError

META = "meta.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def read_meta(folder: Path) -> dict:
    path = folder / META
    if not path.is_file():  # a nanoGPT folder: its meta.pkl, where it has one
        return read_meta_pkl(folder / META_PKL) if (folder / META_PKL).is_file() else {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # not UTF-8, or not JSON
        raise UserError(f"{path} is not valid JSON ({str(err)[:80]}); run bigmodel prepare again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size", 0), int):
        raise UserError(f"{path} is not a bigmodel prepare meta file; run bigmodel prepare again")
    tokenizer = meta.get("tokenizer")
    problem = tokenizer_problem(tokenizer) if tokenizer is not None else None
    if problem:
        raise UserError(f"{path} has a broken tokenizer ({problem}); run bigmodel prepare again")
    return meta


class TokenFiles(DataModule):
    unit = "tokens"

    def __init__(self, dir: Optional[str] = None, batch_size: int = 12, block_size: int = 64,
                 dtype: Optional[str] = None, vocab_size: Optional[int] = None,
                 prefetch: Optional[int] = None):
        super().__init__(batch_size)
        if prefetch is not None and prefetch < 0:
            raise UserError(f"data.prefetch={prefetch} must be 0 (off) or more batches")
        if vocab_size is not None and vocab_size < 1:
            raise UserError(f"data.vocab_size must be > 0 (got {vocab_size}); null takes it from meta.json")
        if not dir:
            raise UserError("data=tokens needs data.dir=<folder with train.bin and val.bin>; "
                            "make one with bigmodel prepare")
        self.folder = user_path(dir)
        self.block_size, self.dtype, self.vocab_size, self.prefetch = block_size, dtype, vocab_size, prefetch
        self.meta: dict = {}
        self.tokens: Dict[str, np.ndarray] = {}
        self.device = torch.device("cpu")

    def setup(self) -> None:
        if not self.folder.is_dir():
            raise UserError(f"data.dir={self.folder} does not exist; make it with bigmodel prepare ... "
                            f"out={self.folder}")
        self.meta = read_meta(self.folder)
        dtype = self.dtype or self.meta.get("dtype", "uint16")
        if dtype not in DTYPES:
            where = "data.dtype" if self.dtype else f"{META}'s dtype"
            raise UserError(f"{where}={dtype} is not supported; use uint16 or uint32")
        vocab = self.vocab_size or self.meta.get("vocab_size")
        if not vocab:
            raise UserError(f"{self.folder} has no {META} or {META_PKL} to give the vocabulary size; set "
                            "data.vocab_size (e.g. 50304 for GPT-2 tokens)")
        if vocab < self.meta.get("vocab_size", 0):
            raise UserError(f"data.vocab_size={vocab} is smaller than the {self.meta['vocab_size']} token ids "
                            f"of {self.folder}; leave it null to take it from its meta file")
        for split in ("train", "val", "test"):
            path = self.folder / f"{split}.bin"
            if path.is_file():
                self.tokens[split] = self.open_tokens(path, dtype, self.meta.get("tokens", {}).get(split))
            elif split != "test":
                raise UserError(f"{path} is missing; data=tokens needs train.bin and val.bin")
        self.tokens.setdefault("test", self.tokens["val"])  # nanoGPT-style dirs have no test split
        short = [k for k, t in self.tokens.items() if len(t) < self.block_size + 2]
        if short:
            raise UserError(f"the {', '.join(short)} split has fewer than block_size+2={self.block_size + 2} "
                            "tokens; use more text or a smaller data.block_size")
        self._spec = DataSpec("language_modeling", "tokens", (self.block_size,), int(vocab),
                              vocab_size=int(vocab), block_size=self.block_size)
        self.check_token_ids(int(vocab))

    def check_token_ids(self, vocab_size: int, head: int = 1 << 24) -> None:
        """Look at the first `head` ids of each file at once (a few milliseconds), so that
        a vocabulary too small for the files is refused at start; batches check the rest."""
        for split in ("train", "val", "test"):
            if split in self.tokens and len(self.tokens[split]):
                largest = int(self.tokens[split][:head].max())
                if largest >= vocab_size:
                    raise token_out_of_range(largest, vocab_size, self.source(split))

    @staticmethod
    def open_tokens(path: Path, dtype: str, expected: Optional[int]) -> np.ndarray:
        """Memory-map a token file, refusing one that is empty, torn, or of another dtype."""
        try:
            tokens = np.memmap(path, dtype=DTYPES[dtype], mode="r")
        except ValueError:  # empty, or a size that is not a whole number of tokens
            raise UserError(f"{path} ({path.stat().st_size} bytes) is not a {dtype} token file; check data.dtype "
                            "or run bigmodel prepare again") from None
        if expected is not None and len(tokens) != expected:
            raise UserError(f"{path} holds {len(tokens):,} {dtype} tokens but {META} says {expected:,}; it is "
                            "incomplete or from another prepare: run bigmodel prepare again")
        return tokens

    def state_dict(self) -> dict:
        return {"tokenizer": self.meta.get("tokenizer")}

    def to(self, device: torch.device) -> "TokenFiles":
        self.device = device  # the files stay mapped; each batch is copied over on its own
        return self

    def train_batches(self, seed: int, rank: int = 0, world_size: int = 1):
        sampler = RandomWindows(self.tokens["train"], self.block_size, self.batch_size, seed, rank, world_size,
                                self.device, self.spec.vocab_size, self.source("train"))
        depth = self.prefetch if self.prefetch is not None else (2 if self.device.type == "cuda" else 0)
        # The sampler draws from its own seeded generators, never the global RNG: safe in a thread.
        return Prefetched(sampler, depth) if depth else sampler

    def eval_batches(self, split: str, batch_size: Optional[int] = None, rank: int = 0, world_size: int = 1):
        check_split(split, self.tokens)
        return SequentialWindows(self.tokens[split], self.block_size, batch_size or self.batch_size,
                                      rank, world_size, self.device, self.spec.vocab_size, self.source(split))

    def source(self, split: str) -> str:
        # A nanoGPT-style folder has no test.bin: its val.bin serves as the test split.
        name = split if (self.folder / f"{split}.bin").is_file() else "val"
        return str(self.folder / f"{name}.bin")

    def units_per_sample(self) -> int:
        return self.block_size

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(t):,}" for k, t in self.tokens.items())
        kind = (self.meta.get("tokenizer") or {}).get("kind", "unknown")
        return f"TokenFiles ({self.folder}, {kind} tokenizer): {sizes} tokens; vocabulary {self.spec.vocab_size}"

"""`data=hf`: Hugging Face `datasets` sources (a save_to_disk folder, or local parquet /
JSONL / CSV / text files), tokenized once and cached.

- With `data.label_column`: text classification. Each text becomes block_size token ids
  (cut, or padded with one extra id, `vocab_size - 1`); labels are numbered in sorted
  order and travel with the checkpoint.
- Without: language modelling on the texts joined by newlines, in windows like data=text.

The token arrays are cached as .npy files (read back with allow_pickle=False) under
data.cache_dir, keyed by the files' paths, sizes and times and every setting that changes
the tokens, so a second run starts at once and a changed file is tokenized again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from bigmodel_cli.data.base import DataModule, DataSpec, check_split
from bigmodel_cli.data.hf_files import Files, column, load_splits, source_signature
from bigmodel_cli.data.tokenizers import TOKENIZERS, tokenizer_for_corpus, tokenizer_from_state
from bigmodel_cli.data.windows import RandomWindows, SequentialWindows
from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bigmodel" / "hf-tokens"


class HFData(DataModule):
    unit = "tokens"  # language modelling; a classifier's throughput counts texts (set in __init__)

    def __init__(self, batch_size: int = 16, path: Optional[str] = None, files: Optional[Files] = None,
                 text_column: str = "text", label_column: Optional[str] = None, tokenizer: str = "byte",
                 tokenizer_path: Optional[str] = None, block_size: int = 128, val_fraction: float = 0.1, seed: int = 0,
                 cache_dir: Optional[str] = None):
        super().__init__(batch_size)
        if tokenizer not in TOKENIZERS:
            raise UserError(f"data.tokenizer={tokenizer} is not one of {', '.join(TOKENIZERS)}")
        if block_size < 1 or not 0 < val_fraction < 1:
            raise UserError(f"data.block_size must be >= 1 and data.val_fraction in (0, 1) "
                            f"(got {block_size}, {val_fraction})")
        if OmegaConf.is_config(files):  # a list or table given in the config
            files = OmegaConf.to_container(files)
        self.path, self.files = path, files
        self.text_column, self.label_column, self.tokenizer_name = text_column, label_column, tokenizer
        self.tokenizer_path = tokenizer_path
        self.unit = "samples" if label_column is not None else "tokens"
        self.block_size, self.val_fraction, self.seed = block_size, val_fraction, seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.tokenizer: Any = None
        self.labels: Optional[List[Any]] = None
        self.tokens: Dict[str, np.ndarray] = {}  # language modelling: one id stream per split
        self.device = torch.device("cpu")

    @property
    def classifies(self) -> bool:
        return self.label_column is not None

    def state_dict(self) -> dict:
        return {"tokenizer": self.tokenizer.state_dict() if self.tokenizer else None, "labels": self.labels}

    def load_state_dict(self, state: dict) -> None:
        self.tokenizer = tokenizer_from_state(state.get("tokenizer"), "the checkpoint's data tokenizer")
        labels = state.get("labels")
        if labels is not None and (not isinstance(labels, list) or len(set(map(str, labels))) != len(labels)):
            raise UserError("the checkpoint's label list is broken; use another checkpoint")
        self.labels = labels

    # ---- building the arrays (or reading them from the cache)
    def setup(self) -> None:
        folder = self.cache_dir / self.cache_key()
        restored = self.state_dict() if self.tokenizer is not None else None  # from a checkpoint
        arrays = self.from_cache(folder, restored)
        if arrays is None:
            arrays = self.tokenize()
            if restored is None:  # a checkpoint's own vocabulary never replaces the data's cache
                write_cache(folder, arrays, self.state_dict())
        self.fill(arrays)

    def from_cache(self, folder: Path, restored: Optional[dict]) -> Optional[Dict[str, np.ndarray]]:
        """The cached arrays, or None to tokenize: none cached, a damaged cache (removed, to be
        written again), or one made with another vocabulary than a checkpoint's."""
        cached = read_cache(folder, self.expected_arrays())
        if cached is None:
            shutil.rmtree(folder, ignore_errors=True)
            return None
        arrays, state = cached
        if restored is not None:
            return arrays if state == restored else None
        try:
            self.load_state_dict(state)
            if self.tokenizer is None or (self.classifies and not self.labels):
                problem = "it holds no tokenizer or labels"
            else:
                problem = arrays_problem(arrays, self.classifies, self.block_size, self.tokenizer.vocab_size,
                                         len(self.labels))
        except UserError as err:
            problem = str(err)
        if problem is None:
            return arrays
        log.warning("token cache %s is damaged (%s); tokenizing again", folder, problem)
        self.tokenizer, self.labels = None, None
        shutil.rmtree(folder, ignore_errors=True)
        return None

    def expected_arrays(self) -> List[str]:
        splits = ("train", "val", "test")
        return [f"{s}_{p}" for s in splits for p in "xy"] if self.classifies else list(splits)

    def cache_key(self) -> str:
        settings = {"version": CACHE_VERSION, "source": source_signature(self.path, self.files),
                    "text": self.text_column, "label": self.label_column, "tokenizer": self.tokenizer_name,
                    "tokenizer_file": source_signature(self.tokenizer_path, None) if self.tokenizer_path else None,
                    "block": self.block_size, "val": self.val_fraction,
                    "seed": self.seed}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def tokenize(self) -> Dict[str, np.ndarray]:
        splits = load_splits(self.path, self.files)
        texts = {name: ["" if t is None else str(t) for t in column(part, self.text_column, "text_column", name)]
                 for name, part in splits.items()}
        if self.tokenizer is None:  # char and bpe are fitted on every split's text (never on labels), so
            # a character only the validation texts hold does not stop the run
            self.tokenizer, _ = tokenizer_for_corpus(self.tokenizer_name, None, self.tokenizer_path,
                                                     lambda: "\n".join("\n".join(t) for t in texts.values()))
        if not self.classifies:
            return self.split_stream({name: self.encode_stream(t) for name, t in texts.items()})
        labels = {name: checked_labels(column(part, self.label_column, "label_column", name), self.label_column, name)
                  for name, part in splits.items()}
        if self.labels is None:
            self.labels = sorted(set(labels["train"]), key=lambda v: (str(type(v)), v))
            if len(self.labels) < 2:
                raise UserError(f"the training split has a single label ({self.labels[0]!r}) in data.label_column="
                                f"{self.label_column}; a classifier needs two or more")
        arrays = {}
        for name in texts:
            arrays[f"{name}_x"] = self.encode_texts(texts[name])
            arrays[f"{name}_y"] = self.label_ids(labels[name], name)
        return self.split_samples(arrays)

    def encode_stream(self, texts: List[str]) -> np.ndarray:
        return np.asarray(self.tokenizer.encode("\n".join(texts)), dtype=np.int64)

    def encode_texts(self, texts: List[str]) -> np.ndarray:
        pad = self.tokenizer.vocab_size
        out = np.full((len(texts), self.block_size), pad, dtype=np.int64)
        for row, text in enumerate(texts):  # once per data set; the result is cached
            ids = np.asarray(self.tokenizer.encode(text), dtype=np.int64)[:self.block_size]
            out[row, :len(ids)] = ids
        return out

    def label_ids(self, values: List[Any], split: str) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        unknown = sorted({str(v) for v in values if v not in index})
        if unknown:
            raise UserError(f"the {split} split has labels the training split lacks ({', '.join(unknown[:5])}); "
                            "every label must occur in training")
        return np.asarray([index[v] for v in values], dtype=np.int64)

    def split_stream(self, streams: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """A validation part cut from the end of train when the data has none; test
        falls back to validation."""
        if "val" not in streams:
            train = streams["train"]
            cut = len(train) - int(len(train) * self.val_fraction)
            streams["train"], streams["val"] = train[:cut], train[cut:]
        streams.setdefault("test", streams["val"])
        return streams

    def split_samples(self, arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """A seeded share of train for validation when the data has none; test falls back to it."""
        if "val_x" not in arrays:
            order = np.random.default_rng(self.seed).permutation(len(arrays["train_x"]))
            n_val = max(1, int(len(order) * self.val_fraction))
            val, train = order[:n_val], order[n_val:]
            for part in ("x", "y"):
                whole = arrays[f"train_{part}"]
                arrays[f"train_{part}"], arrays[f"val_{part}"] = whole[train], whole[val]
        for part in ("x", "y"):
            arrays.setdefault(f"test_{part}", arrays[f"val_{part}"])
        return arrays

    def fill(self, arrays: Dict[str, np.ndarray]) -> None:
        vocab = self.tokenizer.vocab_size
        if self.classifies:
            self.splits = {name: (torch.from_numpy(arrays[f"{name}_x"]), torch.from_numpy(arrays[f"{name}_y"]))
                           for name in ("train", "val", "test")}
            if min(len(x) for x, _ in self.splits.values()) < 1:
                raise UserError("a split of data=hf has no samples; use more data or another data.val_fraction")
            self._spec = DataSpec("classification", "tokens", (self.block_size,), len(self.labels),
                                  vocab_size=vocab + 1, block_size=self.block_size)
            return
        self.tokens = {name: arrays[name] for name in ("train", "val", "test")}
        short = [k for k, t in self.tokens.items() if len(t) < self.block_size + 2]
        if short:
            raise UserError(f"the {', '.join(short)} split has fewer than block_size+2={self.block_size + 2} "
                            "tokens; use more text or a smaller data.block_size")
        self._spec = DataSpec("language_modeling", "tokens", (self.block_size,), vocab,
                              vocab_size=vocab, block_size=self.block_size)

    # ---- batches
    def to(self, device: torch.device) -> "HFData":
        self.device = device
        return super().to(device) if self.classifies else self

    def train_batches(self, seed: int, rank: int = 0, world_size: int = 1):
        if self.classifies:
            return super().train_batches(seed, rank, world_size)
        return RandomWindows(self.tokens["train"], self.block_size, self.batch_size, seed, rank, world_size,
                             self.device)

    def eval_batches(self, split: str, batch_size: Optional[int] = None, rank: int = 0, world_size: int = 1):
        if self.classifies:
            return super().eval_batches(split, batch_size, rank, world_size)
        check_split(split, self.tokens)
        return SequentialWindows(self.tokens[split], self.block_size, batch_size or self.batch_size,
                                 rank, world_size, self.device)

    def units_per_sample(self) -> int:
        return 1 if self.classifies else self.block_size

    def describe(self) -> str:
        source = self.path or self.files
        if self.classifies:
            sizes = ", ".join(f"{k} {len(x):,}" for k, (x, _) in self.splits.items())
            return f"HFData ({source}): {sizes} texts; {len(self.labels)} labels; tokenizer {self.tokenizer.kind}"
        sizes = ", ".join(f"{k} {len(t):,}" for k, t in self.tokens.items())
        return f"HFData ({source}): {sizes} tokens; tokenizer {self.tokenizer.kind}"


def checked_labels(values: List[Any], column_name: str, split: str) -> List[Any]:
    """Labels are text or finite numbers (they are numbered, and stored with the checkpoint)."""
    for value in values:
        fine = isinstance(value, (str, int)) or (isinstance(value, float) and math.isfinite(value))
        if not fine:
            raise UserError(f"data.label_column={column_name} holds {str(value)[:30]!r} ({type(value).__name__}) "
                            f"in the {split} split; labels must be text or finite numbers")
    return values


def arrays_problem(arrays: Dict[str, np.ndarray], classifies: bool, block_size: int, vocab: int,
                   num_labels: int) -> Optional[str]:
    """What makes cached arrays unusable: shapes that do not fit together, ids outside the
    embedding, labels outside the classes. None if they are fine."""
    for split in ("train", "val", "test"):
        if classifies:
            x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
            if x.ndim != 2 or x.shape[1] != block_size or y.shape != (len(x),):
                return f"the {split} arrays have shapes {x.shape} and {y.shape}"
            ranges = ((x, vocab + 1), (y, num_labels))
        else:
            if arrays[split].ndim != 1:
                return f"the {split} tokens have shape {arrays[split].shape}"
            ranges = ((arrays[split], vocab),)
        for array, top in ranges:
            if array.size and (int(array.min()) < 0 or int(array.max()) >= top):
                return f"{split} ids fall outside 0..{top - 1}"
    return None


def read_cache(folder: Path, names: List[str]) -> Optional[Tuple[Dict[str, np.ndarray], dict]]:
    """The cached arrays and data state, or None when absent or damaged (then they are
    built again). Only integer arrays of the expected names are taken."""
    if not (folder / "state.json").is_file():
        return None
    try:
        state = json.loads((folder / "state.json").read_text())
        arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in names}
        if not isinstance(state, dict) or any(a.dtype != np.int64 for a in arrays.values()):
            raise ValueError("unexpected contents")
        return arrays, state
    except (OSError, ValueError, MemoryError) as err:  # MemoryError: a header claiming a vast shape
        log.warning("token cache %s is damaged (%s); tokenizing again", folder, err)
        return None


def write_cache(folder: Path, arrays: Dict[str, np.ndarray], state: dict) -> None:
    """Written to a temporary folder and renamed into place, so a killed run or another
    rank writing the same cache never leaves a half-written one. A cache that cannot be
    written (read-only or full disk) only costs the next run the tokenizing."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder.parent)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    except OSError as err:
        log.warning("could not cache the tokens in %s (%s); the next run tokenizes again", folder, err)
        return
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        (tmp / "state.json").write_text(json.dumps(state))
        os.replace(tmp, folder)
    except OSError as err:
        if not (folder / "state.json").is_file():  # else another rank has just put the same cache in place
            log.warning("could not cache the tokens in %s (%s); the next run tokenizes again", folder, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed into place


def remove_stale_temporaries(parent: Path, older_than_s: float = 3600) -> None:
    """Half-written caches of killed runs (a live writer takes seconds, not an hour)."""
    for tmp in parent.glob(".tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # another process removed it first

"""nanoGPT's `meta.pkl` (vocab_size, itos, stoi), read without running anything in it.

A pickle is a program: its GLOBAL and REDUCE opcodes import and call whatever it names.
nanoGPT's char datasets pickle a plain dict, so the unpickler here refuses to look up
any class or function at all; a file that asks for one is refused before anything in it
runs. What it builds is then checked to hold only dicts, lists, tuples, strings and ints,
and to be a consistent character vocabulary.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional

from bigmodel_cli.errors import UserError, first_line

META_PKL = "meta.pkl"
MAX_BYTES = 1 << 20  # nanoGPT's char meta.pkl is under 1 kB; a character vocabulary stays small
PLAIN_TYPES = (dict, list, tuple, str, int)
MAX_ITEMS = 1 << 20  # keys, values and elements walked in all (a 65-character vocabulary: ~300)


class Refused(pickle.UnpicklingError):
    """The pickle asked for something beyond plain data."""


class DataOnlyUnpickler(pickle.Unpickler):
    """Builds only pickle's own data types; every lookup of a class or function is refused."""

    def find_class(self, module: str, name: str):
        raise Refused(f"it asks to run code ({module}.{name})")

    def persistent_load(self, pid):
        raise Refused("it refers to objects outside the file")


def read_meta_pkl(path: Path) -> Dict[str, Any]:
    """The vocabulary of a nanoGPT `meta.pkl`: {"vocab_size": n} plus, where it has `itos`,
    {"tokenizer": {"kind": "char", "vocab": [...]}}. A UserError for anything else."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise _damaged(path, f"{size:,} bytes, more than a nanoGPT vocabulary needs")
    try:
        meta = DataOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    except Refused as err:
        raise _damaged(path, str(err)) from None
    except Exception as err:  # truncated or garbled: UnpicklingError, EOFError, ValueError, ...
        raise _damaged(path, f"not a readable pickle: {first_line(err)}") from None
    problem = plain_data_problem(meta) or meta_problem(meta)
    if problem:
        raise _damaged(path, problem)
    out: Dict[str, Any] = {"vocab_size": meta["vocab_size"]}
    if "itos" in meta:
        out["tokenizer"] = {"kind": "char", "vocab": [meta["itos"][i] for i in range(meta["vocab_size"])]}
    return out


def _damaged(path: Path, problem: str) -> UserError:
    return UserError(f"{path} is refused ({problem}); a nanoGPT meta.pkl holds only vocab_size, itos and "
                     "stoi: remake it with nanoGPT's prepare.py, or remove it and set data.vocab_size")


def plain_data_problem(value: Any, budget: int = MAX_ITEMS) -> Optional[str]:
    """What in `value` is not a dict, list, tuple, str or int (bools and floats included).
    Walked with a budget of items, not only a depth: a pickle can reuse one list many times
    (its memo), so a few kilobytes can stand for billions of items."""
    stack: List[Any] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if budget < 0:
            return f"it holds more than {MAX_ITEMS:,} items, more than a vocabulary"
        if depth > 4:
            return "it is nested deeper than a vocabulary"
        if type(item) not in PLAIN_TYPES:
            return f"it holds a {type(item).__name__}, not plain data"
        if isinstance(item, dict):
            stack.extend((x, depth + 1) for pair in item.items() for x in pair)
        elif isinstance(item, (list, tuple)):
            stack.extend((x, depth + 1) for x in item)
    return None


def meta_problem(meta: Any) -> Optional[str]:
    """What makes nanoGPT's {vocab_size, itos, stoi} inconsistent, or None."""
    if not isinstance(meta, dict):
        return f"it is a {type(meta).__name__}, not a dict"
    n = meta.get("vocab_size")
    if not isinstance(n, int) or not 1 <= n <= 2**32:
        return "its vocab_size is not a whole number from 1 to 2^32"
    itos, stoi = meta.get("itos"), meta.get("stoi")
    if itos is None and stoi is None:
        return None  # a vocabulary size alone: the folder trains, but cannot be decoded
    if not isinstance(itos, dict) or len(itos) != n or set(itos) != set(range(n)):
        return f"its itos does not map each id 0..{n - 1} to a character"
    if not all(isinstance(c, str) and len(c) == 1 for c in itos.values()) or len(set(itos.values())) != n:
        return "its itos maps ids to something other than distinct single characters"
    if stoi is not None and stoi != {c: i for i, c in itos.items()}:
        return "its stoi and itos disagree"
    return None

"""What a user's Dataset holds, read from its samples: the task, the input shape, the
number of classes or the vocabulary, as a DataSpec; and the host-side check of each batch
that keeps a label or token id the model has no output for from reaching the device.

The task is inferred from the first training sample (x, y), unless data.task says it:
    an integer scalar y              -> classification (classes: max label + 1)
    a float scalar or float vector y -> regression (one output per target value)
    integer x[T] and y[T]            -> language modelling (vocabulary: max id + 1)
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from bigmodel_cli.data.base import Batch, DataSpec, input_kind_of
from bigmodel_cli.errors import UserError, first_line

log = logging.getLogger("bigmodel")

TASKS = ("classification", "regression", "language_modeling")
#: the most samples read at start to count classes or token ids; more need data.num_classes / data.vocab_size
MAX_SCAN = 20_000


def as_tensor(value: Any) -> Optional[torch.Tensor]:
    """A sample's field as a tensor (from a tensor, NumPy array or number), else None."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def describe(value: Any) -> str:
    """`an int64 tensor of shape ()`, `a str`: what a sample's field is, for an error."""
    if isinstance(value, torch.Tensor):
        text = f"{str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    else:
        text = type(value).__name__
    return f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


def sample_at(dataset: Dataset, index: int, source: str) -> Any:
    """dataset[index], or one line naming the sample, the error and the fix: the Dataset's
    own `read_fix(index)` where it has one (an image folder names the damaged file)."""
    try:
        return dataset[index]
    except Exception as err:  # the user's __getitem__, a damaged file
        read_fix = getattr(dataset, "read_fix", None)
        fix = read_fix(index) if callable(read_fix) else "fix the Dataset's __getitem__"
        raise UserError(f"reading sample {index} of {source} failed ({type(err).__name__}: {first_line(err)}); "
                        f"{fix}") from None


def read_sample(dataset: Dataset, source: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first sample as (x, y) tensors, or one line saying what it is instead."""
    sample = sample_at(dataset, 0, source)
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        got = f"a {type(sample).__name__} of {len(sample)}" if isinstance(sample, (tuple, list)) else describe(sample)
        raise UserError(f"sample 0 of {source} is {got}; each sample must be an (x, y) pair: (input tensor, label or "
                        "target)")
    x, y = (as_tensor(v) for v in sample)
    if x is None or y is None:
        raise UserError(f"sample 0 of {source} is ({describe(sample[0])}, {describe(sample[1])}); x and y must be "
                        "tensors, NumPy arrays or numbers")
    return x, y


def infer_task(x: torch.Tensor, y: torch.Tensor) -> str:
    if y.is_floating_point():
        return "regression"
    if not x.is_floating_point() and x.dim() == 1 and tuple(y.shape) == tuple(x.shape):
        return "language_modeling"
    return "classification"


def check_sample(task: str, x: torch.Tensor, y: torch.Tensor, source: str) -> None:
    """One line for a sample that the task (given or inferred) cannot take."""
    got = f"sample 0 of {source} is ({describe(x)}, {describe(y)})"
    if task == "language_modeling":
        if x.is_floating_point() or x.dim() != 1 or tuple(y.shape) != tuple(x.shape) or y.is_floating_point():
            raise UserError(f"{got}; language modelling needs (x, y) as integer token ids of one length [T], "
                            "y being x shifted by one")
        return
    if not x.is_floating_point() or not 1 <= x.dim() <= 3 or x.numel() == 0:
        raise UserError(f"{got}; {task} needs a float x shaped [features], [steps, features] or "
                        "[channels, height, width]")
    if task == "classification" and (y.dim() != 0 or y.is_floating_point() or y.dtype == torch.bool):
        raise UserError(f"{got}; classification needs an integer class index as y (set data.task=regression "
                        "for float targets)")
    if task == "regression" and (y.dim() > 1 or not y.is_floating_point()):
        raise UserError(f"{got}; regression needs a float y (a number or a vector of targets)")


def largest_id(datasets: Sequence[Dataset], source: str, key: str, fields: Tuple[int, ...]) -> int:
    """The largest label (fields (1,)) or token id (fields (0, 1)) in every split."""
    n = sum(len(d) for d in datasets)
    if n > MAX_SCAN:
        raise UserError(f"{source} has {n:,} samples, too many to read at start to count them; set {key}")
    largest = 0
    for dataset in datasets:
        for i in range(len(dataset)):
            largest = max(largest, largest_in(sample_at(dataset, i, source), fields, f"sample {i} of {source}"))
    log.info("read all %s samples of %s to find %s (set %s to skip this)", f"{n:,}", source, key, key)
    return largest


def largest_in(sample: Any, fields: Tuple[int, ...], name: str) -> int:
    try:
        return max(int(torch.as_tensor(sample[f]).max()) for f in fields)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
        raise UserError(f"{name} has no integer label or ids to count ({type(err).__name__}: {first_line(err)}); "
                        "every sample must be an (x, y) pair like sample 0") from None


def class_count(datasets: Sequence[Dataset], given: Optional[int], source: str) -> int:
    """data.num_classes, else the dataset's own `classes` list, else max label + 1."""
    if given is not None:
        return given
    classes = getattr(datasets[0], "classes", None)
    if isinstance(classes, Sequence) and len(classes) >= 2:
        return len(classes)
    return max(2, largest_id(datasets, source, "data.num_classes", (1,)) + 1)


def spec_from_samples(datasets: Sequence[Dataset], source: str, task: Optional[str], num_classes: Optional[int],
                      vocab_size: Optional[int]) -> DataSpec:
    """The DataSpec of a data set given as its splits (the first one's first sample decides
    the task and shapes; classes and vocabulary count every split's)."""
    x, y = read_sample(datasets[0], source)
    task = task or infer_task(x, y)
    check_sample(task, x, y, source)
    shape = tuple(x.shape)
    if task == "language_modeling":
        vocab = vocab_size or largest_id(datasets, source, "data.vocab_size", (0, 1)) + 1
        return DataSpec(task, "tokens", shape, vocab, vocab_size=vocab, block_size=len(x))
    if task == "classification":
        return DataSpec(task, input_kind_of(shape), shape, class_count(datasets, num_classes, source))
    return DataSpec(task, input_kind_of(shape), shape, max(1, y.numel()))


def batch_check(spec: DataSpec, source: str):
    """The host-side check of each collated batch: ids in range (a cheap max on the host, so
    an id the model has no output for is one line, not a device-side assert), and a scalar
    regression target made [batch, 1], the models' output shape."""
    limit, key = ((spec.num_outputs, "data.num_classes") if spec.task == "classification" else
                  (spec.vocab_size, "data.vocab_size") if spec.task == "language_modeling" else (None, ""))

    def check(x: torch.Tensor, y: torch.Tensor) -> Batch:
        if spec.task == "regression":
            return x, (y[:, None] if y.dim() == 1 else y)
        ids = (x, y) if spec.task == "language_modeling" else (y,)
        for t in ids:
            low, high = int(t.min()), int(t.max())
            if low < 0 or high >= limit:
                bad = low if low < 0 else high
                raise UserError(f"{source} holds {'label' if spec.task == 'classification' else 'token id'} "
                                f"{bad}, outside 0..{limit - 1}; set {key} to at least {high + 1} "
                                "(labels and ids count from 0)")
        return x, y

    return check

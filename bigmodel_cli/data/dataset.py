"""`data=dataset data.source=mypkg.make_dataset`: train on a user's own torch Dataset.

`data.source` names, as a dotted import path found like a `_target_` (on sys.path, else
in the working directory), a map-style Dataset class, a function that returns Datasets, or
a Dataset object; `data.kwargs` are passed to it. It may give one Dataset (validation,
and optionally test, samples are split off it by a permutation drawn from data.seed), a
(train, val[, test]) tuple or a dict with those keys. Without a test split the final test
metrics are those of the validation split. Each sample is an (x, y) pair; the task and the
sizes the model needs come from the samples (data/samples.py) or from data.task,
data.num_classes and data.vocab_size. Batches come from a DataLoader (data/loaders.py).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, IterableDataset, Subset

from bigmodel_cli.data.base import DataModule, check_split
from bigmodel_cli.data.loaders import Reading, TrainBatches, eval_batches
from bigmodel_cli.data.samples import TASKS, batch_check, spec_from_samples
from bigmodel_cli.dotted_path import import_object
from bigmodel_cli.errors import UserError, first_line

SPLITS = ("train", "val", "test")
EXPECTED = ("a map-style torch Dataset (with __getitem__ and __len__), a (train, val[, test]) tuple of them, "
            "or a dict with 'train' and optionally 'val' and 'test'")


def is_map_style(obj: Any) -> bool:
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, (str, bytes, Mapping))


def what_it_is(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        kinds = sorted({type(item).__name__ for item in obj})
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(kinds) or 'nothing'})"
    if isinstance(obj, Mapping):
        return f"a dict with keys {', '.join(map(str, obj)) or '(none)'}"
    return f"a {type(obj).__name__}"


def seeded_split(dataset: Dataset, fractions: Dict[str, float], seed: int, source: str) -> Dict[str, Dataset]:
    """Train plus one split per fraction, as disjoint Subsets of a permutation drawn from `seed`."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = {name: max(1, round(n * frac)) for name, frac in fractions.items()}
    if n - sum(sizes.values()) < 1:
        raise UserError(f"{source} has {n} samples, too few to split off "
                        f"{' and '.join(f'{k} ({v})' for k, v in sizes.items())} and keep some to train on")
    splits, end = {}, n
    for name, size in sizes.items():  # held-out splits from the end, training from the start
        splits[name] = Subset(dataset, order[end - size:end])
        end -= size
    return {"train": Subset(dataset, order[:end]), **splits}


class TorchDataset(DataModule):
    """Any map-style torch Dataset (see the module's docstring); subclasses such as
    ImageFolder override `load` and `label`."""

    def __init__(self, source: Optional[str] = None, kwargs: Optional[Mapping] = None, batch_size: int = 64,
                 task: Optional[str] = None, num_classes: Optional[int] = None, vocab_size: Optional[int] = None,
                 val_fraction: float = 0.1, test_fraction: Optional[float] = None, seed: int = 0,
                 num_workers: int = 0):
        super().__init__(batch_size)
        if task is not None and task not in TASKS:
            raise UserError(f"data.task={task} is not a task; use {', '.join(TASKS)}, or null to infer it")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0 (got {num_workers}); 0 reads in the main process")
        if num_classes is not None and num_classes < 2:
            raise UserError(f"data.num_classes must be >= 2 (got {num_classes}); null counts the labels")
        if vocab_size is not None and vocab_size < 1:
            raise UserError(f"data.vocab_size must be > 0 (got {vocab_size}); null counts the token ids")
        self.source = source
        # Hydra hands a nested node over as a DictConfig: the user's function gets plain values.
        plain = OmegaConf.to_container(kwargs, resolve=True) if isinstance(kwargs, DictConfig) else kwargs
        self.kwargs = dict(plain or {})
        self.task, self.num_classes, self.vocab_size = task, num_classes, vocab_size
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.num_workers = num_workers
        self.datasets: Dict[str, Dataset] = {}
        self.device = torch.device("cpu")
        self.test_is_val = False

    # ---- what the data is
    def label(self) -> str:
        """How errors name this data."""
        return f"data.source={self.source}"

    def load(self) -> Any:
        """The user's Datasets: data.source imported and (unless it is a Dataset) called."""
        if not self.source:
            raise UserError("data=dataset needs data.source=<module.DatasetClass or module.function returning "
                            "Datasets>, e.g. data.source=mypkg.make_dataset")
        try:
            obj = import_object(str(self.source))
        except Exception as err:  # a missing module or name, or the user's module failing as it is imported
            raise UserError(f"data.source={self.source} cannot be imported ({type(err).__name__}: "
                            f"{first_line(err)}); give the dotted path of a Dataset class or a function") from None
        if is_map_style(obj) and not isinstance(obj, type):
            return obj
        if not callable(obj):
            raise UserError(f"data.source={self.source} is {what_it_is(obj)}, not a Dataset class or a function "
                            "returning Datasets")
        try:
            return obj(**self.kwargs)
        except UserError:
            raise
        except Exception as err:  # the user's code, or kwargs it does not take
            args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
            raise UserError(f"{self.source}({args}) failed ({type(err).__name__}: {first_line(err)}); check "
                            "the function and data.kwargs") from None

    def named_splits(self, loaded: Any) -> Dict[str, Dataset]:
        """What `load` gave, as {split name: Dataset}; only train is required."""
        if isinstance(loaded, Mapping):
            unknown = [k for k in loaded if k not in SPLITS]
            if "train" not in loaded or unknown:
                raise UserError(f"{self.label()} gave {what_it_is(loaded)}; expected {EXPECTED}")
            named = dict(loaded)
        elif isinstance(loaded, (tuple, list)) and 2 <= len(loaded) <= 3 and all(map(is_map_style, loaded)):
            named = dict(zip(SPLITS, loaded))
        elif isinstance(loaded, IterableDataset) or (is_map_style(loaded) and not isinstance(loaded, (tuple, list))):
            named = {"train": loaded}
        else:
            raise UserError(f"{self.label()} gave {what_it_is(loaded)}; expected {EXPECTED}")
        for name, dataset in named.items():
            if isinstance(dataset, IterableDataset) or not is_map_style(dataset):
                kind = "an IterableDataset" if isinstance(dataset, IterableDataset) else what_it_is(dataset)
                raise UserError(f"{self.label()} gave {kind} as its {name} split; expected {EXPECTED}")
            if len(dataset) == 0:
                raise UserError(f"{self.label()} gave an empty {name} split (0 samples)")
        return named

    # ---- DataModule
    def setup(self) -> None:
        named = self.named_splits(self.load())
        given: List[Dataset] = list(named.values())
        # Held out of train: val when not given; test too when one Dataset came with data.test_fraction.
        held_out = {name: frac for name, frac in (("val", self.val_fraction), ("test", self.test_fraction))
                    if name not in named and frac is not None and (name == "val" or len(named) == 1)}
        if held_out:
            named = {**seeded_split(named.pop("train"), held_out, self.seed, self.label()), **named}
        self.test_is_val = "test" not in named
        named.setdefault("test", named["val"])
        self.datasets = {name: named[name] for name in SPLITS}
        self._spec = spec_from_samples(given, self.label(), self.task, self.num_classes, self.vocab_size)
        if self._spec.task == "language_modeling":
            self.unit = "tokens"

    def to(self, device: torch.device) -> "TorchDataset":
        self.device = device  # batches are copied over as they are read
        return self

    def reading(self) -> Reading:
        return Reading(self.num_workers, self.device, batch_check(self.spec, self.label()), self.label(),
                       "every sample must be an (x, y) pair of tensors of one shape and dtype")

    def train_batches(self, seed: int, rank: int = 0, world_size: int = 1):
        train = self.datasets["train"]
        if len(train) < world_size:
            raise UserError(f"the train split has {len(train)} samples, fewer than the {world_size} ranks")
        return TrainBatches(train, self.batch_size, seed, rank, world_size, self.reading())

    def eval_batches(self, split: str, batch_size: Optional[int] = None, rank: int = 0, world_size: int = 1):
        check_split(split, self.datasets)
        return eval_batches(self.datasets[split], batch_size or self.batch_size, rank, world_size, self.reading())

    def units_per_sample(self) -> int:
        return self.spec.block_size or 1

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(d):,}" for k, d in self.datasets.items() if not (k == "test" and self.test_is_val))
        test = "; test: the val split" if self.test_is_val else ""
        spec = self.spec
        sizes_of = {"classification": f"{spec.num_outputs} classes", "regression": f"{spec.num_outputs} targets",
                    "language_modeling": f"vocabulary {spec.vocab_size}"}[spec.task]
        return (f"{self.label()}: {sizes} samples{test}; task {spec.task}, input {spec.input_shape}, "
                f"{sizes_of}")

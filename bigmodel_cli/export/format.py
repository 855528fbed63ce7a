"""What every export format provides (one subclass per format module)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from bigmodel_cli.build.inference import TrainedModel

#: reads an exported model back: inputs -> logits, as numbers on the CPU
Runner = Callable[[torch.Tensor], torch.Tensor]


class Format:
    name = ""
    extra: Optional[str] = None  # the pip extra it needs (`pip install 'bigmodel[<extra>]'`)
    modules: Tuple[str, ...] = ()  # what must be importable to write it
    check_modules: Tuple[str, ...] = ()  # what must be importable to read it back (else not checked)
    tolerance = 1e-4  # the largest difference from the model's logits that passes the check
    #: the int8 schemes of `bigmodel compress` (quantize.py) it writes faithfully, and why not the others
    int8_schemes: Tuple[str, ...] = ()
    int8_why = "it has no int8 layers"

    def __init__(self) -> None:
        self.notes: List[str] = []  # what a user of the files should know (written to export.json)

    def refusal(self, trained: TrainedModel, model: nn.Module) -> Optional[str]:
        """Why this model cannot be written in this format (which part, and why), or None."""
        return None

    def write(self, trained: TrainedModel, model: nn.Module, example: torch.Tensor, out: Path) -> List[str]:
        """Write the export into `out` (an empty folder); the names of the files written."""
        raise NotImplementedError

    def runner(self, out: Path, trained: TrainedModel) -> Runner:
        """The written export, loaded as its users would load it."""
        raise NotImplementedError

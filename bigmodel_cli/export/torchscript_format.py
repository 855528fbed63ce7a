"""format=torchscript: the eval-mode model traced with torch.jit.trace (model.torchscript),
loadable with torch.jit.load and no bigmodel. torch 2.13 marks torch.jit deprecated (in
favour of torch.export) but it still works; its warnings are silenced here."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List

import torch
from torch import nn

from bigmodel_cli.build.inference import TrainedModel
from bigmodel_cli.export.format import Format, Runner

FILE = "model.torchscript"


class TorchScript(Format):
    name = "torchscript"
    int8_schemes = ("dynamic", "weight_only")  # tracing records the int8 kernels as they run

    def write(self, trained: TrainedModel, model: nn.Module, example: torch.Tensor, out: Path) -> List[str]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice, and tracer notes on Python ifs
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(out / FILE))
        return [FILE]

    def runner(self, out: Path, trained: TrainedModel) -> Runner:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(out / FILE), map_location="cpu")

"""format=onnx: the eval-mode model through torch.onnx.export (model.onnx, opset of the
dynamo exporter), its batch dimension (and a language model's length) dynamic; checked with onnxruntime where installed.
Needs the extra `onnx` (onnx, onnxscript; onnxruntime for the check)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import List

import torch
from torch import nn

from bigmodel_cli.build.inference import TrainedModel
from bigmodel_cli.export.format import Format, Runner

FILE = "model.onnx"
INPUT, OUTPUT = "input", "logits"


class Onnx(Format):
    name = "onnx"
    extra = "onnx"
    modules = ("onnx", "onnxscript")
    check_modules = ("onnxruntime",)
    int8_schemes = ("weight_only",)  # its int8 matmuls are plain ops; dynamic int8 runs torch's own kernels
    int8_why = "torch.onnx cannot export torch's dynamic int8 kernels (quantized::linear_dynamic and the like)"

    def write(self, trained: TrainedModel, model: nn.Module, example: torch.Tensor, out: Path) -> List[str]:
        dims = {0: torch.export.Dim("batch", min=1)}
        if trained.checkpoint.spec.input_kind == "tokens":  # any prompt length up to the context
            dims[1] = torch.export.Dim("tokens", min=1, max=example.shape[1])
        quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export")]
        levels = [q.level for q in quiet]
        try:
            for q in quiet:  # the exporter narrates each stage on the console
                q.setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(out / FILE), input_names=[INPUT], output_names=[OUTPUT],
                                  dynamic_shapes=(dims,), dynamo=True, external_data=False, verbose=False)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
        return [FILE]

    def runner(self, out: Path, trained: TrainedModel) -> Runner:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / FILE), providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run([OUTPUT], {INPUT: x.cpu().numpy()})[0])

        return run

"""Export one checkpoint in one format: check the format can be written here and fits the
model, write the files into a staging folder, read them back as their users would and
compare their logits with the model's on the same input, then move them into place with
export.json (the report). A failure at any point leaves nothing behind in the folder."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Type

import torch

from bigmodel_cli.build.inference import open_trained, ready_model
from bigmodel_cli.compress.quantize import DYNAMIC, quantized_layers
from bigmodel_cli.data.base import DataSpec
from bigmodel_cli.engine.logits import logits_of
from bigmodel_cli.errors import UserError
from bigmodel_cli.export.format import Format

log = logging.getLogger("bigmodel")

#: format name -> (module, class), imported when chosen
FORMATS = {"safetensors": ("safetensors_format", "Safetensors"),
           "torchscript": ("torchscript_format", "TorchScript"),
           "onnx": ("onnx_format", "Onnx"),
           "hf": ("hf_gpt2", "HuggingFaceGPT2")}
REPORT_FILE = "export.json"
STAGING = ".export-partial"


def format_named(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(f"unknown export format '{name}'; choose one of {', '.join(FORMATS)}")
    fmt = format_class(name)()
    missing = [m for m in fmt.modules if importlib.util.find_spec(m) is None]
    if missing:
        fix = f"pip install 'bigmodel[{fmt.extra}]'" if fmt.extra else f"pip install {' '.join(missing)}"
        raise UserError(f"format={name} needs {' and '.join(missing)}, "
                        f"which {'is' if len(missing) == 1 else 'are'} not installed; {fix}")
    return fmt


def format_class(name: str) -> Type[Format]:
    module, cls = FORMATS[name]
    return getattr(importlib.import_module(f"bigmodel_cli.export.{module}"), cls)


def example_input(spec: DataSpec, batch: int = 2) -> torch.Tensor:
    """A fixed input of the data's shape: token ids in the vocabulary, or normal noise."""
    gen = torch.Generator().manual_seed(0)
    if spec.input_kind == "tokens":
        return torch.randint(0, spec.vocab_size or spec.num_outputs, (batch, *spec.input_shape), generator=gen)
    return torch.randn((batch, *spec.input_shape), generator=gen)


def export(ckpt: str, name: str, out: Path, trusted: Sequence[str] = ()) -> Dict[str, Any]:
    """Write checkpoint `ckpt` in format `name` into the folder `out`; returns the report."""
    fmt = format_named(name)
    trained = open_trained(ckpt, trusted, sections=("model",))
    model = ready_model(trained, torch.device("cpu"))
    refusal = int8_refusal(fmt, trained) or fmt.refusal(trained, model)
    if refusal:
        raise UserError(f"format={name} cannot export {trained.checkpoint.path}: {refusal}")
    example = example_input(trained.checkpoint.spec)
    staging = out / STAGING
    staging.mkdir(parents=True)
    try:
        files = written(fmt, trained, model, example, staging)
        check = compare(fmt, staging, trained, model, example)
        for entry in sorted(staging.iterdir()):
            entry.rename(out / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report(trained, name, files, check, fmt.notes)


def int8_refusal(fmt: Format, trained) -> Optional[str]:
    """Why `fmt` cannot hold the int8 layers of a `bigmodel compress method=quantize`
    checkpoint, or None (the checkpoint is not quantized, or the format takes its scheme)."""
    layers = quantized_layers(trained.checkpoint.config)
    schemes = sorted({entry.get("scheme", DYNAMIC) for entry in layers.values()})
    if not layers or set(schemes) <= set(fmt.int8_schemes):
        return None
    takes = [n for n in FORMATS if set(schemes) <= set(format_class(n).int8_schemes)]
    return (f"its layers {', '.join(list(layers)[:3])} are int8-quantized ({'/'.join(schemes)}) and {fmt.int8_why}; "
            f"export the fp32 checkpoint it was compressed from{', or use format=' + ' or '.join(takes) if takes else ''}")


def written(fmt: Format, trained, model: torch.nn.Module, example: torch.Tensor, staging: Path):
    """fmt.write, an exporter's failure on this model (an op it cannot express) as one line
    naming the format and the exporter's reason; the traceback goes to the log file."""
    try:
        return fmt.write(trained, model, example, staging)
    except (UserError, OSError, MemoryError):
        raise
    except Exception as err:
        log.debug("format=%s failed", fmt.name, exc_info=True)
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"format={fmt.name} cannot export {trained.checkpoint.path} "
                        f"({type(err).__name__}: {reason[:200]}); use another format") from None


def compare(fmt: Format, folder: Path, trained, model: torch.nn.Module, example: torch.Tensor) -> Dict[str, Any]:
    """The written files' logits against the model's on `example` (the largest difference),
    or why they could not be read back here."""
    missing = [m for m in fmt.check_modules if importlib.util.find_spec(m) is None]
    if missing:
        return {"checked": False, "reason": f"{', '.join(missing)} not installed (pip install 'bigmodel[{fmt.extra}]')"}
    with torch.no_grad():
        expected = logits_of(model(example)).float()
        got = logits_of(fmt.runner(folder, trained)(example)).float()
    if got.shape != expected.shape:
        raise UserError(f"the exported {fmt.name} model returns {tuple(got.shape)} where the checkpoint's returns "
                        f"{tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    tolerance = fmt.tolerance * max(1.0, expected.abs().max().item())
    if not diff <= tolerance:
        raise UserError(f"the exported {fmt.name} model's logits differ from the checkpoint's by up to {diff:.3g} "
                        f"(tolerance {tolerance:.3g}); this model does not export faithfully to {fmt.name}")
    return {"checked": True, "max_abs_diff": diff, "tolerance": tolerance, "input_shape": list(example.shape)}


def report(trained, name: str, files, check: Dict[str, Any], notes) -> Dict[str, Any]:
    checkpoint = trained.checkpoint
    spec = checkpoint.spec
    return {"format": name, "source": str(checkpoint.path.absolute()), "step": checkpoint.step,
            "model": trained.config.model.get("_target_"), "files": list(files), "check": check,
            "input": {"kind": spec.input_kind, "shape": ["batch", *spec.input_shape],
                      "dtype": "int64" if spec.input_kind == "tokens" else "float32"},
            "output": {"task": spec.task, "num_outputs": spec.num_outputs}, "notes": list(notes)}


def summary_line(result: Dict[str, Any], out: Path) -> str:
    check = result["check"]
    checked: Optional[str] = (f"outputs match the checkpoint's within {check['max_abs_diff']:.2g} "
                              f"(tolerance {check['tolerance']:.2g})" if check["checked"]
                              else f"not checked: {check['reason']}")
    return f"exported {result['format']}: {out} ({', '.join(result['files'])}); {checked}"

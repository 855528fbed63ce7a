"""The numbers compared before and after compression: parameters and their nonzero share
per layer, the serialized size of the weights, CPU latency per batch, and the metric."""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping

import torch
from torch import nn

from bigmodel_cli.compress.weight_only import SCALE
from bigmodel_cli.data.base import DataModule
from bigmodel_cli.engine.tasks import Task
from bigmodel_cli.engine.trainer import evaluate_model

CPU = torch.device("cpu")


@dataclass
class LayerCount:
    name: str  # the module's name in the model, e.g. net.1
    kind: str  # its class, e.g. Linear or DynamicQuantizedLinear
    parameters: int
    nonzero: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.parameters if self.parameters else 0.0


@dataclass
class Measurement:
    parameters: int
    nonzero: int
    weights_bytes: int  # the weights alone (with int8 scales), serialized as a checkpoint stores them
    latency_ms: float  # median CPU time of one forward pass over a batch
    batch_size: int
    metrics: Dict[str, float]
    layers: List[LayerCount] = field(default_factory=list)
    file_bytes: int = 0  # the checkpoint file on disk (with the optimizer state, if it has one)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.parameters if self.parameters else 0.0

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["sparsity"] = self.sparsity
        out["layers"] = [{**asdict(layer), "sparsity": layer.sparsity} for layer in self.layers]
        return out


def weight_tensors(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The entries of a state dict that are weights (not buffers such as batch-norm
    statistics), each tensor once although tied weights appear under two names."""
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}  # a tied layer's scales too
    seen, out = set(), {}
    for name, tensor in state.items():
        if name in buffers or name.endswith("num_batches_tracked"):
            continue
        key = id(tensor) if tensor.is_quantized else (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                                                        tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def layer_counts(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> List[LayerCount]:
    """Parameters and nonzero weights per layer (an int8 weight counts as zero where it
    quantized to zero)."""
    kinds = {name: module._get_name() for name, module in model.named_modules()}  # DynamicQuantizedLinear
    layers: Dict[str, LayerCount] = {}
    for name, tensor in weights.items():
        owner = name.rpartition(".")[0]
        values = tensor.dequantize() if tensor.is_quantized else tensor
        layer = layers.setdefault(owner, LayerCount(owner, kinds.get(owner, "?"), 0, 0))
        layer.parameters += values.numel()
        layer.nonzero += int(torch.count_nonzero(values))
    return list(layers.values())


def int8_scales(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The row scales of weight-only int8 layers: buffers, yet part of what their weights cost."""
    return {name: tensor for name, tensor in state.items() if name.rpartition(".")[2] == SCALE}


def serialized_bytes(weights: Mapping[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(dict(weights), buffer)
    return buffer.getbuffer().nbytes


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, batch: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median wall time of `repeats` forward passes after `warmup` untimed ones: the median
    shrugs off the odd pass that another process on the machine slowed down."""
    for _ in range(warmup):
        model(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(model: nn.Module, state: Mapping[str, torch.Tensor], data: DataModule, task: Task, split: str,
            repeats: int, warmup: int) -> Measurement:
    """Everything compared before and after, for `model` (on the CPU, in eval mode) whose
    stored weights are `state`."""
    model.eval()
    weights = weight_tensors(model, state)
    layers = layer_counts(model, weights)
    batch, _ = next(iter(data.eval_batches(split)))
    return Measurement(
        parameters=sum(layer.parameters for layer in layers), nonzero=sum(layer.nonzero for layer in layers),
        weights_bytes=serialized_bytes({**weights, **int8_scales(state)}), latency_ms=cpu_latency_ms(model, batch, repeats, warmup),
        batch_size=int(batch.shape[0]), metrics=evaluate_model(model, data, task, split, "fp32", CPU),
        layers=layers)

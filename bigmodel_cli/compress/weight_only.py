"""Weight-only int8 for language models: each Linear's weight (and that of transformers'
Conv1D, GPT-2's transposed Linear) stored as int8 with one fp32 scale per output channel
(row); activations stay float, and the forward pass multiplies them by the int8 matrix
cast to float, then scales each output by its row's scale.

Why our own modules rather than torchao's `quantize_(model, Int8WeightOnlyConfig())`
(torchao 0.18, torch 2.13 CPU, measured on a char GPT): torchao's Int8Tensor runs the very
same float-cast product on the CPU (so it is no faster), but its checkpoint only loads with
torch.load(weights_only=True) after `import torchao` has put some 25 of its classes on
torch's process-wide safe list (optimizer states, GGUF and NF4 tensors among them), every
reader then needs torchao installed, and it quantizes a tied output head apart from its
embedding, storing the table twice. Here the checkpoint holds plain int8 and fp32 tensors
that any torch reads, and the rounding is torchao's (scale = max|w| / 127.5 per row,
round(w / scale) clamped to [-128, 127]; tests/test_compress.py checks it against torchao
where torchao is installed). torch._weight_int8pack_mm computes the same product but is
some 30 times slower than fp32 on this CPU, so it is not used.

Tied weights (GPT's output head is its token embedding): the shared table is quantized
once, row by row; its rows are both the head's output channels and the tokens' vectors,
so one int8 table and one scale per row serve the embedding lookup and the head alike,
and the checkpoint stores them once.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

#: the per-layer scheme name in the compressed checkpoint's record
WEIGHT_ONLY = "weight_only"
#: where each int8 layer keeps its row scales, beside its `weight`
SCALE = "weight_scale"

QMIN, QMAX = -128, 127


def quantize_rows(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scale per row) of a 2-D weight, symmetric, as torchao's
    Int8WeightOnlyConfig rounds them."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / ((QMAX - QMIN) / 2)).clamp(min=torch.finfo(torch.float32).eps)
    values = torch.round(weight * (1.0 / scale[:, None])).clamp(QMIN, QMAX).to(torch.int8)
    return values, scale


class Int8Weights(nn.Module):
    """The int8 matrix and its row scales (the weight a parameter that never trains, so it
    counts as the layer's weights; the scales a buffer)."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(values, requires_grad=False)
        self.register_buffer(SCALE, scale)

    def share(self, other: "Int8Weights") -> None:
        """Hold the very tensors `other` holds (a tied weight, stored once)."""
        self.weight = other.weight
        self.register_buffer(SCALE, getattr(other, SCALE))

    def extra_repr(self) -> str:
        return f"rows={self.weight.shape[0]}, columns={self.weight.shape[1]}, int8 with a scale per row"


class Int8WeightOnlyLinear(Int8Weights):
    def __init__(self, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(values, scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * getattr(self, SCALE).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8WeightOnlyEmbedding(Int8Weights):
    """An embedding table in int8 (the one a tied output head shares): the looked-up rows
    are scaled back to float."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight).float() * getattr(self, SCALE)[idx].unsqueeze(-1)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's layers): a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or is_conv1d(module)


def matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in): a row per output channel (or, for an embedding, per token)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _tied_groups(model: nn.Module) -> List[List[str]]:
    """Names of the modules that share each weight, for every weight some module holds."""
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return list(owners.values())


def plan(model: nn.Module, skip: Sequence[str] = ()) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(layer -> what it shares, '' if nothing) for every Linear (and transformers' Conv1D),
    and every Embedding whose table a Linear shares; (layer -> why not) for the other layers with weights."""
    chosen: Dict[str, str] = {}
    for group in _tied_groups(model):
        modules = [model.get_submodule(name) for name in group]
        kinds_fit = all(is_linear(m) or (type(m) is nn.Embedding and m.max_norm is None) for m in modules)
        has_linear = any(is_linear(m) for m in modules)
        if kinds_fit and has_linear and not set(group) & set(skip):
            chosen.update({name: next((o for o in group if o != name), "") for name in group})
    kept = {}
    for name, module in model.named_modules():
        if name in chosen or not any(True for _ in module.parameters(recurse=False)):
            continue
        kept[name or type(model).__name__] = why_not(module, name in skip)
    return chosen, kept


def why_not(module: nn.Module, skipped: bool) -> str:
    if skipped:
        return "kept in fp32 as quantize.skip asks (with any layer that shares its weight)"
    if type(module) is nn.Embedding:
        return ("an embedding no Linear shares is a table lookup, not a matrix product; "
                "weight-only int8 covers Linear layers and the table a tied output head shares")
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
        return "normalization layers stay fp32 (few weights, sensitive to rounding)"
    return f"{type(module).__name__} is no Linear layer; weight-only int8 covers nn.Linear and transformers' Conv1D"


def _int8_module(module: nn.Module, values: torch.Tensor, scale: torch.Tensor) -> Int8Weights:
    if type(module) is nn.Embedding:
        return Int8WeightOnlyEmbedding(values, scale)
    return Int8WeightOnlyLinear(values, scale, module.bias)


def convert(model: nn.Module, layers: Mapping[str, str], empty: bool = False) -> nn.Module:
    """Swap each layer in `layers` for its int8 counterpart, in place; tied layers share one
    int8 table. `empty`: int8 zeros of the right shapes, for a checkpoint's values to fill."""
    done: Dict[str, Int8Weights] = {}
    for name, tied in layers.items():
        module = model.get_submodule(name)
        weight = matrix(module)
        if empty:
            values, scale = torch.zeros(weight.shape, dtype=torch.int8), torch.ones(weight.shape[0])
        else:
            values, scale = quantize_rows(weight)
        int8 = _int8_module(module, values, scale)
        if tied in done:
            int8.share(done[tied])
        done[name] = int8
    for name, int8 in done.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, int8)
    return model


def damaged_layer(weights: Mapping[str, torch.Tensor], layers: Mapping[str, str]) -> str | None:
    """The first layer whose stored weight is not int8 with a finite, positive float scale per row, if any."""
    for name in layers:
        values, scale = weights.get(f"{name}.weight"), weights.get(f"{name}.{SCALE}")
        if values is None or scale is None or values.dtype != torch.int8 or values.dim() != 2 \
                or scale.dtype != torch.float32 or tuple(scale.shape) != (values.shape[0],) \
                or not bool((torch.isfinite(scale) & (scale > 0)).all()):
            return name
    return None

"""Post-training dynamic int8 quantization for CPU inference (torch.ao.quantization):
Linear, LSTM and GRU weights stored as int8, activations quantized on the fly per batch.

Which layers: every nn.Linear, nn.LSTM and nn.GRU, except those named in quantize.skip and
a Linear whose weight is tied to another layer's (GPT's output head shares its
embedding). Every other layer with weights is kept in fp32 and named with the reason, so
nothing is ever silently left as it was.

Storage: the compressed checkpoint is an ordinary one whose state dict has the fp32
model's names, with the quantized layers' weights as qint8 tensors (int8 values and their
scales), which torch.load(weights_only=True) reads. Its stored config lists the quantized
layers under `compression`; `load_quantized` rebuilds the quantized model from both, with
the very int8 values that were written.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from bigmodel_cli.errors import UserError

#: the layer kinds dynamic int8 covers, and what the config calls each scheme
KERNELS = (nn.Linear, nn.LSTM, nn.GRU)
PER_CHANNEL, PER_TENSOR = "per_channel", "per_tensor"

#: why a layer with weights of another kind stays fp32
WHY_NOT = (
    (nn.RNN, "torch has no dynamic int8 kernel for plain RNN cells (only LSTM and GRU)"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "convolutions need static quantization with calibration data; "
                                        "dynamic int8 covers Linear, LSTM and GRU"),
    (nn.Embedding, "an embedding is a table lookup, not a matrix product; dynamic int8 covers Linear, LSTM and GRU"),
    ((nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm),
     "normalization layers stay fp32 (few weights, sensitive to rounding)"),
)


@contextmanager
def quiet_deprecations() -> Iterator[None]:
    """torch.ao.quantization warns on every use that it moves to torchao; the kernels work."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, message=".*(deprecated|TypedStorage).*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def qconfig(scheme: str):
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    return per_channel_dynamic_qconfig if scheme == PER_CHANNEL else default_dynamic_qconfig


def tied_names(model: nn.Module) -> Dict[str, str]:
    """module name -> another module sharing one of its parameters."""
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    return {name: next(o for o in names if o != name) for names in owners.values() if len(names) > 1
            for name in names}


def why_not(module: nn.Module) -> str:
    for kinds, reason in WHY_NOT:
        if isinstance(module, kinds):
            return reason
    return f"{type(module).__name__} has no dynamic int8 kernel (it covers Linear, LSTM and GRU)"


def plan(model: nn.Module, per_channel: bool, skip: Sequence[str] = ()) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(layer -> weight scheme) for the layers to quantize, and (layer -> why not) for every
    other layer holding weights. A Linear gets one scale per output channel if `per_channel`;
    LSTM and GRU one per matrix (torch's recurrent int8 kernels take no other)."""
    tied = tied_names(model)
    names = {name for name, _ in model.named_modules()}
    unknown = [name for name in skip if name not in names]
    if unknown:
        raise UserError(f"quantize.skip names {unknown[0]!r}, which is no layer of {type(model).__name__}; "
                        f"its layers: {', '.join(n for n in sorted(names) if n)[:300]}")
    chosen, kept = {}, {}
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        label = name or type(model).__name__
        if name in skip:
            kept[label] = "kept in fp32 as quantize.skip asks"
        elif type(module) in KERNELS and name in tied:
            kept[label] = f"its weight is tied to {tied[name] or 'the model'}'s, which stays fp32"
        elif type(module) is nn.Linear:
            chosen[name] = PER_CHANNEL if per_channel else PER_TENSOR
        elif type(module) in (nn.LSTM, nn.GRU):
            chosen[name] = PER_TENSOR
        else:
            kept[label] = why_not(module)
    if not chosen:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(kept.items())[:3])
        raise UserError(f"{type(model).__name__} has no layer that int8 quantization covers (Linear, LSTM, GRU)"
                        f"{' - ' + reasons if reasons else ''}; use method=prune for it")
    return chosen, kept


def quantize(model: nn.Module, layers: Mapping[str, str]) -> nn.Module:
    """A dynamically quantized copy of `model` (the fp32 model is left as it is)."""
    from torch.ao.quantization import quantize_dynamic

    with quiet_deprecations():
        quantized = quantize_dynamic(model, {name: qconfig(s) for name, s in layers.items()}, dtype=torch.qint8)
    missed = [name for name in layers if type(quantized.get_submodule(name)) in KERNELS]
    if missed:  # never a silent no-op
        raise RuntimeError(f"torch left {', '.join(missed)} unquantized")
    return quantized


def int8_entries(module: nn.Module, prefix: str) -> Dict[str, torch.Tensor]:
    """A quantized layer's weights (qint8) and biases (fp32), under the fp32 layer's names."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    if isinstance(module, Int8Linear):
        weight, bias = module.weight(), module.bias()
        return {f"{prefix}weight": weight, **({f"{prefix}bias": bias} if bias is not None else {})}
    with quiet_deprecations():
        tensors = {**module.get_weight(), **module.get_bias()}
    return {f"{prefix}{name}": tensor for name, tensor in tensors.items()}


def int8_state_dict(fp32: nn.Module, quantized: nn.Module, layers: Mapping[str, str]) -> Dict[str, torch.Tensor]:
    """The state dict the compressed checkpoint stores: fp32's names, int8 where quantized."""
    state = dict(fp32.state_dict())
    for name in layers:
        entries = int8_entries(quantized.get_submodule(name), f"{name}.")
        assert set(entries) <= set(state), f"{name}: {sorted(set(entries) - set(state))}"
        state.update(entries)
    return state


def compression_record(layers: Mapping[str, str], kept: Mapping[str, str], source: Path) -> Dict[str, Any]:
    """What the compressed checkpoint's config says about itself (read by `load_quantized`)."""
    return {"method": "quantize", "scheme": "dynamic int8 (torch.ao.quantization)", "source": str(source),
            "layers": [{"name": name, "weights": scheme} for name, scheme in layers.items()],
            "kept_fp32": [{"name": name, "reason": why} for name, why in kept.items()]}


def quantized_layers(config: Mapping[str, Any]) -> Dict[str, str]:
    """layer -> scheme, from a stored config; empty for a checkpoint that is not quantized."""
    record = config.get("compression")
    if not isinstance(record, Mapping) or record.get("method") != "quantize":
        return {}
    entries = record.get("layers")
    if not (isinstance(entries, Sequence) and entries and all(
            isinstance(e, Mapping) and isinstance(e.get("name"), str) and isinstance(e.get("weights"), str)
            for e in entries)):
        raise UserError("the checkpoint's stored config lists no readable int8 layers under 'compression' "
                        "(damaged or edited); use another checkpoint")
    return {entry["name"]: entry["weights"] for entry in entries}


def damaged_layer(model: nn.Module, weights: Mapping[str, torch.Tensor], layers: Mapping[str, str]) -> Optional[str]:
    """The first layer the stored config lists as quantized that is no quantizable layer of
    the model, or whose stored weights are not int8; None if all fit."""
    modules = dict(model.named_modules())
    for name, scheme in layers.items():
        if type(modules.get(name)) not in KERNELS or scheme not in (PER_CHANNEL, PER_TENSOR):
            return name
        own = [k for k in weights if k.startswith(f"{name}.") and k.rpartition(".")[2].startswith("weight")]
        if not own or not all(weights[k].is_quantized for k in own):
            return name
    return None


def load_quantized(model: nn.Module, weights: Mapping[str, torch.Tensor], layers: Mapping[str, str],
                   path: Path) -> nn.Module:
    """The quantized model a compressed checkpoint holds, from its fp32 architecture
    `model`: the other layers get their weights, the quantized ones their exact int8 values."""
    from bigmodel_cli.engine.checkpoint import check_weights_fit

    plain = {name: t.dequantize() if t.is_quantized else t for name, t in weights.items()}
    check_weights_fit(model, plain, path)
    model.load_state_dict(plain)
    bad = damaged_layer(model, weights, layers)
    if bad:
        raise UserError(f"checkpoint {path} is damaged: its config lists {bad} as int8-quantized, but the model "
                        "has no such Linear/LSTM/GRU with int8 weights; use another checkpoint")
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    quantized = quantize(model, layers)
    for name in layers:
        module, prefix = quantized.get_submodule(name), f"{name}."
        if isinstance(module, Int8Linear):
            module.set_weight_bias(weights[f"{prefix}weight"], weights.get(f"{prefix}bias"))
        else:
            with quiet_deprecations():
                module.set_weight_bias({key[len(prefix):]: t for key, t in weights.items() if key.startswith(prefix)})
    return quantized

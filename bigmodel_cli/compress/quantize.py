"""Post-training int8 quantization for CPU inference, one of two schemes per checkpoint:

- dynamic int8 (torch.ao.quantization): Linear, LSTM and GRU weights stored as int8,
  activations quantized on the fly per batch. The default for every model but language
  models.
- weight-only int8 (weight_only.py): Linear weights int8 with a scale per output channel,
  activations float. The default for language models (model=gpt, gpt_small, gpt2,
  hf_causal_lm): their output head is tied to the token embedding, which it quantizes
  too, and decoding one token at a time gains nothing from quantizing activations.

The rest of this docstring is about dynamic int8.

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

from bigmodel_cli.compress import weight_only
from bigmodel_cli.compress.weight_only import WEIGHT_ONLY
from bigmodel_cli.engine.checkpoint import check_weights_fit
from bigmodel_cli.errors import UserError

#: the layer kinds dynamic int8 covers, and what the config calls each scheme
KERNELS = (nn.Linear, nn.LSTM, nn.GRU)
PER_CHANNEL, PER_TENSOR = "per_channel", "per_tensor"
#: quantize.scheme and each layer's scheme in the stored record
AUTO, DYNAMIC = "auto", "dynamic"
SCHEME_NAMES = {DYNAMIC: "dynamic int8 (torch.ao.quantization)",
                WEIGHT_ONLY: "weight-only int8 (int8 weights, a fp32 scale per output channel, float activations)"}

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


def resolve_scheme(scheme: str, task: str) -> str:
    """quantize.scheme=auto: weight-only int8 for language models, dynamic for the others."""
    if scheme != AUTO:
        return scheme
    return WEIGHT_ONLY if task == "language_modeling" else DYNAMIC


def plan(model: nn.Module, per_channel: bool, skip: Sequence[str] = (), scheme: str = DYNAMIC
         ) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(layer -> weight scheme) for the layers to quantize, and (layer -> why not) for every
    other layer holding weights. Dynamic: a Linear gets one scale per output channel if
    `per_channel`; LSTM and GRU one per matrix (torch's recurrent int8 kernels take no other).
    Weight-only: see weight_only.plan (layer -> the layer it shares its weight with, or '')."""
    names = {name for name, _ in model.named_modules()}
    unknown = [name for name in skip if name not in names]
    if unknown:
        raise UserError(f"quantize.skip names {unknown[0]!r}, which is no layer of {type(model).__name__}; "
                        f"its layers: {', '.join(n for n in sorted(names) if n)[:300]}")
    chosen, kept = weight_only.plan(model, skip) if scheme == WEIGHT_ONLY else dynamic_plan(model, per_channel, skip)
    if not chosen:
        covered = "Linear" if scheme == WEIGHT_ONLY else "Linear, LSTM, GRU"
        reasons = "; ".join(f"{k}: {v}" for k, v in list(kept.items())[:3])
        raise UserError(f"{type(model).__name__} has no layer that int8 quantization covers ({covered})"
                        f"{' - ' + reasons if reasons else ''}; use method=prune for it")
    return chosen, kept


def dynamic_plan(model: nn.Module, per_channel: bool, skip: Sequence[str]) -> Tuple[Dict[str, str], Dict[str, str]]:
    tied = tied_names(model)
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


def compression_record(layers: Mapping[str, str], kept: Mapping[str, str], source: Path,
                       scheme: str = DYNAMIC) -> Dict[str, Any]:
    """What the compressed checkpoint's config says about itself (read by `load_quantized`):
    each layer's scheme, and for weight-only int8 the layer a tied weight is shared with."""
    if scheme == WEIGHT_ONLY:
        entries = [{"name": name, "scheme": WEIGHT_ONLY, "weights": PER_CHANNEL, **({"tied_to": tied} if tied else {})}
                   for name, tied in layers.items()]
    else:
        entries = [{"name": name, "scheme": DYNAMIC, "weights": weights} for name, weights in layers.items()]
    return {"method": "quantize", "scheme": SCHEME_NAMES[scheme], "source": str(source), "layers": entries,
            "kept_fp32": [{"name": name, "reason": why} for name, why in kept.items()]}


def quantized_layers(config: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
    """layer -> its stored entry (scheme, weights, tied_to), from a stored config; empty for a
    checkpoint that is not quantized. Entries without a scheme are dynamic int8 (the first
    checkpoints of bigmodel compress)."""
    record = config.get("compression")
    if not isinstance(record, Mapping) or record.get("method") != "quantize":
        return {}
    entries = record.get("layers")
    if not (isinstance(entries, Sequence) and entries and all(
            isinstance(e, Mapping) and isinstance(e.get("name"), str) and isinstance(e.get("weights"), str)
            and e.get("scheme", DYNAMIC) in (DYNAMIC, WEIGHT_ONLY) and isinstance(e.get("tied_to", ""), str)
            for e in entries)):
        raise UserError("the checkpoint's stored config lists no readable int8 layers under 'compression' "
                        "(damaged or edited); use another checkpoint")
    return {entry["name"]: entry for entry in entries}


def damaged_layer(model: nn.Module, weights: Mapping[str, torch.Tensor], layers: Mapping[str, str]) -> Optional[str]:
    """The first layer the stored config lists as quantized that is no quantizable layer of
    the model, or whose stored weights are not int8; None if all fit."""
    modules = dict(model.named_modules())
    for name, scheme in layers.items():
        if type(modules.get(name)) not in KERNELS or scheme not in (PER_CHANNEL, PER_TENSOR):
            return name
        own = [k for k in weights if k.startswith(f"{name}.") and k.rpartition(".")[2].startswith("weight")]
        if not own or not all(is_int8(weights[k]) for k in own):
            return name
    return None


def is_int8(tensor: torch.Tensor) -> bool:
    """A qint8 tensor with finite, positive scales: what torch's dynamic int8 kernels take
    (a NaN scale, say, would crash them or turn every output into NaN)."""
    if not tensor.is_quantized or tensor.dtype != torch.qint8:
        return False
    if tensor.qscheme() == torch.per_tensor_affine:
        scales = torch.tensor([tensor.q_scale()])
    elif tensor.qscheme() == torch.per_channel_affine:
        scales = tensor.q_per_channel_scales()
    else:
        return False
    return bool(torch.isfinite(scales).all() and (scales > 0).all())


def load_quantized(model: nn.Module, weights: Mapping[str, torch.Tensor], layers: Mapping[str, Mapping[str, Any]],
                   path: Path) -> nn.Module:
    """The quantized model a compressed checkpoint holds, from its fp32 architecture
    `model` and the stored entries of its int8 layers (`quantized_layers`)."""
    schemes = {entry.get("scheme", DYNAMIC) for entry in layers.values()}
    if schemes == {WEIGHT_ONLY}:
        return load_weight_only(model, weights, {name: e.get("tied_to", "") for name, e in layers.items()}, path)
    if schemes != {DYNAMIC}:
        raise UserError(f"checkpoint {path} is damaged: its config mixes int8 schemes ({', '.join(sorted(schemes))}), "
                        "which bigmodel compress never writes; use another checkpoint")
    return load_dynamic(model, weights, {name: entry["weights"] for name, entry in layers.items()}, path)


def load_weight_only(model: nn.Module, weights: Mapping[str, torch.Tensor], layers: Mapping[str, str],
                     path: Path) -> nn.Module:
    """Weight-only int8: the int8 layers take the stored int8 values and scales as they are."""
    modules = dict(model.named_modules())
    bad = next((name for name in layers if name not in modules or not (
        weight_only.is_linear(modules[name]) or type(modules[name]) is nn.Embedding)), None)
    bad = bad or weight_only.damaged_layer(weights, layers)
    if bad:
        raise UserError(f"checkpoint {path} is damaged: its config lists {bad} as weight-only int8, but the model "
                        "has no such Linear/Embedding with int8 weights and a finite scale per row; use another checkpoint")
    weight_only.convert(model, layers, empty=True)
    check_weights_fit(model, weights, path)
    model.load_state_dict(weights)
    return model


def load_dynamic(model: nn.Module, weights: Mapping[str, torch.Tensor], layers: Mapping[str, str],
                 path: Path) -> nn.Module:
    """Dynamic int8: the other layers get their weights, the quantized ones their exact int8 values."""
    plain = {name: t.dequantize() if t.is_quantized else t for name, t in weights.items()}
    check_weights_fit(model, plain, path)
    model.load_state_dict(plain)
    bad = damaged_layer(model, weights, layers)
    if bad:
        raise UserError(f"checkpoint {path} is damaged: its config lists {bad} as int8-quantized, but the model "
                        "has no such Linear/LSTM/GRU with qint8 weights and finite scales; use another checkpoint")
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

"""Structured pruning: whole hidden units (MLP) or channels (CNN) removed, so the layers
really shrink: the layer's rows go, and so do the next layer's matching inputs.

Works on a state dict and the model's config, returning smaller ones: the smaller config
is what the compressed checkpoint stores, so `bigmodel eval` rebuilds the smaller model
from it. In each hidden layer the `amount` share of units with the least weight going in
and out (the product of the L2 norms of a unit's incoming weights and bias, or its
batch-norm scale, and of its outgoing weights) is removed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from bigmodel_cli.errors import UserError
from bigmodel_cli.models.cnn import CNN
from bigmodel_cli.models.mlp import MLP

State = Dict[str, torch.Tensor]

#: the models whose layers structured pruning knows how to shrink, and the config key it sets
SUPPORTED = "model=mlp (model.hidden_sizes) and model=cnn (model.channels, model.hidden_size)"


def units_to_keep(score: torch.Tensor, amount: float) -> torch.Tensor:
    """Indices (in order) of the units that stay: all but the `amount` share scoring lowest,
    and at least one."""
    keep = max(1, score.numel() - int(round(amount * score.numel())))
    return torch.sort(torch.topk(score, keep).indices).values


def outgoing_norm(weight: torch.Tensor, width: int) -> torch.Tensor:
    """Per input unit of a Linear/Conv weight, the L2 norm of the weights it feeds; for a
    Linear after a flattened feature map, `width` units each own a block of columns."""
    w = weight.transpose(0, 1).reshape(width, -1)
    return w.norm(dim=1)


def incoming_norm(state: State, prefix: str) -> torch.Tensor:
    w = state[f"{prefix}.weight"]
    rows = w.reshape(w.shape[0], -1)
    bias = state.get(f"{prefix}.bias")
    return torch.cat([rows, bias[:, None]], dim=1).norm(dim=1) if bias is not None else rows.norm(dim=1)


def shrink_outputs(state: State, prefix: str, keep: torch.Tensor) -> None:
    """Keep only the rows (output units) `keep` of a layer: its weight, bias and, for a
    batch norm, its statistics."""
    for key in ("weight", "bias", "running_mean", "running_var"):
        name = f"{prefix}.{key}"
        if name in state:
            state[name] = state[name][keep].clone()


def shrink_inputs(state: State, prefix: str, keep: torch.Tensor, block: int = 1) -> None:
    """Keep only the inputs `keep` of a layer; each input unit owns `block` consecutive
    columns (the pixels of one channel, for a Linear after a flattened feature map)."""
    columns = (keep[:, None] * block + torch.arange(block)).reshape(-1)
    name = f"{prefix}.weight"
    state[name] = state[name][:, columns].clone()


def linear_names(sequential: nn.Sequential, prefix: str, kind: type = nn.Linear) -> List[str]:
    return [f"{prefix}.{i}" for i, layer in enumerate(sequential) if isinstance(layer, kind)]


def shrink_mlp(model: MLP, state: State, amount: float) -> Tuple[State, Dict[str, Any]]:
    layers = linear_names(model.net, "net")
    widths = []
    for here, after in zip(layers, layers[1:]):
        width = state[f"{here}.weight"].shape[0]
        score = incoming_norm(state, here) * outgoing_norm(state[f"{after}.weight"], width)
        keep = units_to_keep(score, amount)
        shrink_outputs(state, here, keep)
        shrink_inputs(state, after, keep)
        widths.append(len(keep))
    return state, {"hidden_sizes": widths}


def shrink_cnn(model: CNN, state: State, amount: float) -> Tuple[State, Dict[str, Any]]:
    convs = linear_names(model.features, "features", nn.Conv2d)
    norms = linear_names(model.features, "features", nn.BatchNorm2d)
    dense = linear_names(model.head, "head")
    channels = []
    for i, here in enumerate(convs):
        after = convs[i + 1] if i + 1 < len(convs) else dense[0]
        width = state[f"{here}.weight"].shape[0]
        block = state[f"{after}.weight"].shape[1] // width if after == dense[0] else 1
        going_in = state[f"{norms[i]}.weight"].abs() if norms else incoming_norm(state, here)
        keep = units_to_keep(going_in * outgoing_norm(state[f"{after}.weight"], width), amount)
        shrink_outputs(state, here, keep)
        if norms:
            shrink_outputs(state, norms[i], keep)
        shrink_inputs(state, after, keep, block)
        channels.append(len(keep))
    hidden, out = dense
    width = state[f"{hidden}.weight"].shape[0]
    keep = units_to_keep(incoming_norm(state, hidden) * outgoing_norm(state[f"{out}.weight"], width), amount)
    shrink_outputs(state, hidden, keep)
    shrink_inputs(state, out, keep)
    return state, {"channels": channels, "hidden_size": len(keep)}


def shrink(model: nn.Module, model_name: str, amount: float) -> Tuple[State, Dict[str, Any]]:
    """The smaller model's state dict and the model config keys that rebuild it."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(model, MLP):
        if len(linear_names(model.net, "net")) < 2:
            raise UserError("this MLP has no hidden layer to prune (model.hidden_sizes is empty); "
                            "use prune.structured=false")
        return shrink_mlp(model, state, amount)
    if isinstance(model, CNN):
        return shrink_cnn(model, state, amount)
    raise UserError(f"structured pruning supports {SUPPORTED}, not model={model_name or type(model).__name__}; "
                    "use prune.structured=false (global magnitude pruning) for it")

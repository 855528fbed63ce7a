"""Global magnitude pruning: the smallest weights across all prunable layers are zeroed
(torch.nn.utils.prune), kept at zero through an optional fine-tune (prune's masks are
re-applied on every forward pass), then made permanent.

Prunable: the weight matrices of Linear, convolution and LSTM/GRU/RNN layers. Biases,
norms and embeddings are left alone (few parameters, or lookups whose rows all matter);
so is a weight tied to another layer's (GPT's output head shares its embedding), since
pruning one name would untie them.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Tuple

from torch import nn
from torch.nn.utils import prune

from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNBase)


def prunable_weights(model: nn.Module) -> Tuple[List[Tuple[nn.Module, str]], Dict[str, str]]:
    """(module, parameter name) of every prunable weight, and the ones left out with why."""
    owners: Dict[int, List[str]] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{name}" if module_name else name)
    chosen, left_out = [], {}
    for module_name, module in model.named_modules():
        if not isinstance(module, PRUNABLE):
            continue
        for name, param in module.named_parameters(recurse=False):
            if not name.startswith("weight"):
                continue
            others = [o for o in owners[id(param)] if o != f"{module_name}.{name}"]
            if others:
                left_out[f"{module_name}.{name}"] = f"tied to {others[0]}; pruning one name would untie them"
            else:
                chosen.append((module, name))
    return chosen, left_out


def prune_globally(model: nn.Module, amount: float) -> Tuple[List[Tuple[nn.Module, str]], Dict[str, str]]:
    """Zero the `amount` share of smallest-magnitude weights over all prunable layers
    together (so layers with many small weights lose more); the masks stay on until
    `make_permanent`. Returns the pruned (module, name)s and the weights left out, with why."""
    chosen, left_out = prunable_weights(model)
    for name, why in left_out.items():
        log.warning("not pruned: %s (%s)", name, why)
    if not chosen:
        raise UserError(f"{type(model).__name__} has no Linear, convolution or recurrent weight to prune")
    prune.global_unstructured(chosen, pruning_method=prune.L1Unstructured, amount=amount)
    return chosen, left_out


def make_permanent(chosen: List[Tuple[nn.Module, str]]) -> None:
    """Fold each mask into its weight (weight = weight_orig * mask) and drop the mask, so
    the model is a plain one again whose state dict has the original names."""
    for module, name in chosen:
        prune.remove(module, name)

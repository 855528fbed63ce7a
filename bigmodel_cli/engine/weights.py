"""Putting a checkpoint's weights into a model: one path for eval, generate, init_from and
the final test, whether the checkpoint is a file or a sharded folder and whether the model
is sharded (FSDP) or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping

import torch
from torch import nn

from bigmodel_cli.engine import distributed, sharded
from bigmodel_cli.errors import UserError


def load_weights(model: nn.Module, state: Dict[str, Any], path: Path) -> None:
    """Fill `model` from a checkpoint read by `load_checkpoint`. Keys or shapes that differ
    are named in one line."""
    if "sharded_dir" in state:  # DCP reads into any layout, sharded or not
        sharded.load_model(model, Path(state["sharded_dir"]))
        return
    weights = state["model"]
    check_weights_fit(model, weights, path)
    if distributed.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(weights)


def check_weights_fit(model: nn.Module, weights: Mapping[str, torch.Tensor], path: Path) -> None:
    # (An FSDP2 parameter is a DTensor whose shape is the whole tensor's, not its shard's.)
    own = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    problems = [f"{k} missing from the checkpoint" for k in own if k not in weights]
    problems += [f"{k} is not in this model" for k in weights if k not in own]
    problems += [f"{k} has shape {tuple(weights[k].shape)} in the checkpoint but {own[k]} here"
                 for k in own if k in weights and tuple(weights[k].shape) != own[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"checkpoint {path} does not fit this model: {'; '.join(problems[:3])}{more}; "
                        "use the model settings of the run that wrote it")

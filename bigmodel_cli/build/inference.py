"""A trained model, ready for inference, from a checkpoint: what eval, generate and every
later command that reads weights start from.

The checkpoint's stored config rebuilds the model, but only after `trust.vetted_config`
has checked that it names nothing but bigmodel's own classes (or `trusted_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from bigmodel_cli.build.parts import build_model
from bigmodel_cli.compress.quantize import load_quantized as int8_model
from bigmodel_cli.compress.quantize import quantized_layers
from bigmodel_cli.data.base import DataSpec
from bigmodel_cli.engine.checkpoint import Checkpoint, load_weights
from bigmodel_cli.engine.device import use_tf32
from bigmodel_cli.engine.find_checkpoint import Pick, find_checkpoint
from bigmodel_cli.errors import UserError
from bigmodel_cli.trust import vetted_config


@dataclass
class TrainedModel:
    checkpoint: Checkpoint
    config: DictConfig  # its stored config, vetted
    model: Optional[nn.Module] = None  # on the device, in eval mode, once `ready_model` ran


def open_trained(ckpt: str, trusted_targets: Sequence[str] = (), sections: Sequence[str] = ("model",)
                 ) -> TrainedModel:
    """The checkpoint `ckpt` names (file, sharded folder or run dir: its best), checked byte
    for byte, with its stored config vetted in `sections` (those that will be instantiated)."""

    checkpoint = find_checkpoint(Path(ckpt), Pick.BEST)
    return TrainedModel(checkpoint, vetted_config(checkpoint.config, checkpoint.path, trusted_targets, sections))


def ready_model(trained: TrainedModel, device: torch.device, spec: Optional[DataSpec] = None) -> nn.Module:
    """Build the model the checkpoint was trained as (for `spec`, by default its own data's),
    fill it with the checkpoint's weights, and put it on `device` in eval mode, with the
    matmul precision it trained with."""

    checkpoint = trained.checkpoint
    names = checkpoint.choices
    model = build_model(trained.config.model, spec or checkpoint.spec, names.get("model", ""), names.get("data", ""))
    int8_layers = quantized_layers(checkpoint.config)
    if int8_layers:  # written by `bigmodel compress method=quantize`
        model = load_quantized(model, checkpoint, int8_layers, device)
    else:
        load_weights(model, checkpoint)
    use_tf32(bool(trained.config.trainer.get("tf32", True)), device)
    trained.model = model.to(device).eval()
    return trained.model


def load_quantized(model: nn.Module, checkpoint: Checkpoint, layers, device: torch.device) -> nn.Module:
    """The int8 model of a quantized checkpoint, built on its fp32 architecture `model`."""

    if device.type != "cpu" or checkpoint.is_sharded:
        raise UserError(f"checkpoint {checkpoint.path} is int8-quantized for CPU inference; run it with device=cpu")
    return int8_model(model, checkpoint.model, layers, checkpoint.path)

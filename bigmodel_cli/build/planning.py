"""Builder mode `plan`: a config's model and optimizer on fake tensors (shapes and dtypes, no
storage), for `bigmodel plan` to step through and measure before any device is allocated.
Built as `bigmodel train` builds them: the same model and optimizer builders, and activation
checkpointing applied by the engine where the run's would be."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from bigmodel_cli.build.parts import build_model, build_optimizer, engine_recomputes
from bigmodel_cli.data.base import DataSpec
from bigmodel_cli.engine.parallelize import checkpoint_activations


@dataclass
class PlannedParts:
    model: nn.Module
    optimizer: Any
    recomputes: bool  # the engine checkpoints the blocks' activations


def fake_mode() -> FakeTensorMode:
    """Fake tensors that also take real inputs (copied as fake ones)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def build_planned(cfg: DictConfig, spec: DataSpec) -> PlannedParts:
    """The model of `cfg` for `spec`, in training mode, and its optimizer; call it inside
    `fake_mode()` so that nothing is allocated."""
    model = build_model(cfg.model, spec)
    recomputes = engine_recomputes(cfg.model)
    if recomputes:
        checkpoint_activations(model)
    model.train()
    return PlannedParts(model, build_optimizer(cfg.optim, model), recomputes)

"""How a model runs, applied in one place and in one order; model files never do any of it.

    1. activation checkpointing  each repeated block recomputes its activations in the
                                 backward pass (model.activation_checkpointing=true)
    2. DDP or FSDP2              under several processes (trainer.strategy); FSDP shards each
                                 repeated block, then the root
    3. torch.compile             last, so it compiles the wrapped model (trainer.compile=true)

Under trainer.parallel.pp>1 the model is first cut into pipeline stages, and each rank then
recomputes and compiles only the blocks it runs; data parallelism is the pipeline's own
(engine/pipeline.py, engine/pipeline_step.py).

The optimizer is built afterwards, over the parameters this returns (FSDP replaces them
with shards). Checkpoints hold the plain model's state-dict keys whatever was applied:
checkpointing keeps the module tree as it is, and the trainer unwraps DDP and compile.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bigmodel_cli.config import TrainerConfig
from bigmodel_cli.engine import distributed
from bigmodel_cli.engine.distributed import DistEnv, repeated_blocks


def parallelize(model: nn.Module, settings: TrainerConfig, env: DistEnv, device: torch.device,
                checkpoint_blocks: bool = False, mesh=None) -> nn.Module:
    """The model ready to train: with activation checkpointing, wrapped for the processes, compiled."""
    if settings.parallel.pp > 1:  # pipeline stages: cut first (engine/pipeline.py)
        from bigmodel_cli.engine.pipeline import parallelize_stages

        return parallelize_stages(model, settings, mesh["pp"].get_local_rank(), checkpoint_blocks)
    if checkpoint_blocks:
        checkpoint_activations(model)
    model = distributed.wrap(model, settings.strategy, env, device, settings.precision)
    if settings.compile:
        model = torch.compile(model)
    return model


def checkpoint_activations(model: nn.Module) -> None:
    """Each repeated block keeps only its input in training and recomputes the rest in the
    backward pass: less memory for about a third more compute. The block's forward is
    replaced in place, so module names (and state-dict keys) stay as they are."""
    blocks = repeated_blocks(model)
    if not blocks:
        from bigmodel_cli.errors import UserError

        raise UserError(f"model.activation_checkpointing=true needs repeated blocks (a ModuleList), and "
                        f"{type(model).__name__} has none; set model.activation_checkpointing=false")
    for block in blocks:
        block.forward = recomputing(block, block.forward)


def recomputing(block: nn.Module, forward: Callable) -> Callable:
    def forward_with_recompute(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return forward_with_recompute

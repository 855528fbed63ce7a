"""How a model runs, applied in one place and in one order; model files never do any of it.

The run's one DeviceMesh has the dimensions ("pp", "dp", "tp") (engine/mesh.py). Without
pipeline stages (below), the steps are:

    1. tensor parallelism        trainer.parallel.tp=T: each planned layer's weights are
                                 split over mesh["tp"] (engine/tensor_parallel.py), and
                                 the blocks' norms and residual stream over the sequence
                                 (trainer.parallel.sequence_parallel)
    2. activation checkpointing  each repeated block recomputes its activations in the
                                 backward pass (model.activation_checkpointing=true)
    3. torch.compile             each repeated block (or the whole model, if it has none),
                                 in place, so module names and state-dict keys stay as they
                                 are (trainer.compile=true)
    4. FSDP2 or DDP              data parallelism over mesh["dp"] (trainer.strategy): FSDP
                                 shards each repeated block, then the root, composing with
                                 tensor parallelism into 2-D (dp, tp) DTensors; DDP
                                 replicates a model that is not split (a split one's
                                 replicas are averaged by the trainer after the backward
                                 pass, as DDP would, without its overlap)

Under trainer.parallel.pp>1 the model is first cut into pipeline stages, and the same steps
then apply to the blocks each rank runs, with each stage as FSDP's root (engine/pipeline.py;
under ddp the pipeline averages its replicas' gradients itself, engine/pipeline_step.py).

The optimizer is built afterwards, over the parameters this returns (FSDP and TP replace
them with DTensors). Checkpoints hold the plain model's state-dict keys whatever was
applied: checkpointing and compile keep the module tree as it is, and the trainer unwraps DDP.
"""

from __future__ import annotations

import torch
from torch import nn

from bigmodel_cli.config import TrainerConfig
from bigmodel_cli.engine import distributed
from bigmodel_cli.engine.distributed import DistEnv, repeated_blocks
from bigmodel_cli.engine.recompute import recomputing
from bigmodel_cli.errors import UserError


def parallelize(model: nn.Module, settings: TrainerConfig, env: DistEnv, device: torch.device,
                checkpoint_blocks: bool = False, mesh=None) -> nn.Module:
    """The model ready to train: split over the tp ranks, with activation checkpointing,
    compiled, and sharded or replicated over the data-parallel ranks."""
    if settings.parallel.pp > 1:  # pipeline stages: cut first (engine/pipeline.py)
        from bigmodel_cli.engine.pipeline import parallelize_stages

        return parallelize_stages(model, settings, mesh, checkpoint_blocks, device)
    tp = int(settings.parallel.tp)
    if tp > 1:
        from bigmodel_cli.engine.tensor_parallel import apply_tensor_parallel, use_sequence_parallel

        if mesh is None:
            raise UserError(f"trainer.parallel.tp={tp} needs {tp} processes; start them with "
                            f"trainer.devices={tp}, torchrun or srun")
        apply_tensor_parallel(model, mesh["tp"], use_sequence_parallel(settings.parallel.sequence_parallel, model,
                                                                        device.type, tp))
    if checkpoint_blocks:
        checkpoint_activations(model)
    if settings.compile:
        compile_in_place(model)
    if env.is_distributed:
        model = data_parallel(model, settings, device, mesh)
    return model


def data_parallel(model: nn.Module, settings: TrainerConfig, device: torch.device, mesh) -> nn.Module:
    """DDP or FSDP2 over the mesh's "dp" dimension, as trainer.strategy says."""
    if settings.strategy == "fsdp":
        return distributed.shard_fully(model, mesh["dp"], settings.precision)
    if int(settings.parallel.tp) > 1:  # DDP wraps plain tensors only: the trainer averages the replicas
        return model
    return distributed.replicate(model, device, mesh.get_group("dp"))


def replicated_by_hand(settings: TrainerConfig, dp: int) -> bool:
    """Whether the trainer averages the replicas' gradients itself after the backward pass:
    ddp over a model tensor parallelism split (pipeline stages do it in their own step)."""
    return settings.strategy == "ddp" and dp > 1 and settings.parallel.tp > 1 and settings.parallel.pp == 1


def compile_in_place(model: nn.Module) -> None:
    """torch.compile each repeated block (or the whole model), keeping the module tree."""
    for module in repeated_blocks(model) or [model]:
        module.compile()


def checkpoint_activations(model: nn.Module) -> None:
    """Each repeated block keeps only its input in training and recomputes the rest in the
    backward pass: less memory for about a third more compute. The block's forward is
    replaced in place, so module names (and state-dict keys) stay as they are."""
    blocks = repeated_blocks(model)
    if not blocks:
        raise UserError(f"model.activation_checkpointing=true needs repeated blocks (a ModuleList), and "
                        f"{type(model).__name__} has none; set model.activation_checkpointing=false")
    for block in blocks:
        block.forward = recomputing(block, block.forward)

"""How the ranks of a run divide the work: pipeline stages x data-parallel replicas x
tensor-parallel shards, on one DeviceMesh with named dimensions ("pp", "dp", "tp").

Ranks are laid out row-major over (pp, dp, tp), as torchtitan does: the tp ranks of one
replica are neighbours (on one node, where their many collectives are cheapest), and a
pipeline stage's ranks are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from bigmodel_cli.config import ParallelConfig
from bigmodel_cli.errors import UserError

MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class Layout:
    """The sizes of the three dimensions; their product is the world size."""

    dp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def splits_model(self) -> bool:
        return self.tp > 1 or self.pp > 1

    def coordinates(self, rank: int) -> "Coordinates":
        """Where global rank `rank` sits on the mesh."""
        return Coordinates(pp=rank // (self.dp * self.tp), dp=(rank // self.tp) % self.dp, tp=rank % self.tp)

    def describe(self) -> str:
        return f"dp={self.dp} x tp={self.tp} x pp={self.pp} ({self.world_size} ranks)"


@dataclass(frozen=True)
class Coordinates:
    pp: int
    dp: int
    tp: int


def layout_for(world_size: int, parallel: ParallelConfig) -> Layout:
    """The layout of `world_size` ranks under trainer.parallel: data parallelism fills what
    tp x pp leave. A world that does not factor is one line naming the numbers and a fix."""
    tp, pp = int(parallel.tp), int(parallel.pp)
    if world_size % (tp * pp) != 0:
        raise UserError(f"{world_size} rank{'s' if world_size != 1 else ''} do{'es' if world_size == 1 else ''} not split into trainer.parallel.tp={tp} x trainer.parallel.pp={pp} "
                        f"(= {tp * pp}); use a world size that is a multiple of {tp * pp} "
                        f"(trainer.devices x trainer.num_nodes), e.g. {suggested_world(world_size, tp * pp)} ranks, "
                        f"or set tp and pp so that tp x pp divides {world_size}")
    return Layout(dp=world_size // (tp * pp), tp=tp, pp=pp)


def suggested_world(world_size: int, unit: int) -> int:
    """The nearest multiple of `unit` not below it (at least `unit`)."""
    return max(unit, -(-world_size // unit) * unit)


def build_mesh(layout: Layout, device: torch.device):
    """The run's one DeviceMesh (all three dimensions, size 1 where unused), built once after
    the process group; None in a single process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    if dist.get_world_size() != layout.world_size:
        raise UserError(f"the process group has {dist.get_world_size()} ranks but the layout {layout.describe()} "
                        f"needs {layout.world_size}")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (layout.pp, layout.dp, layout.tp), mesh_dim_names=MESH_DIMS)


@dataclass(frozen=True)
class DataShare:
    """Which share of the training data a rank reads: the tp ranks of a replica and the
    stages of a pipeline read the same batches; only data-parallel replicas differ."""

    rank: int = 0
    world_size: int = 1


def data_share(layout: Optional[Layout], rank: int) -> DataShare:
    if layout is None:
        return DataShare()
    return DataShare(layout.coordinates(rank).dp, layout.dp)

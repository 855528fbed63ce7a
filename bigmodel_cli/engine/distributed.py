"""Everything about running as one of many processes, in one place.

Where ranks come from: torchrun (or our own launcher, which is torch's elastic launcher
too) sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; `srun` sets
SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS, and the master is the step's first
node with a port derived from the job and step ids. RANK/WORLD_SIZE win when both are
set (srun + torchrun).
"""

from __future__ import annotations

import atexit
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from bigmodel_cli.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    source: str = "single"  # "single" | "torchrun" | "slurm"

    @property
    def is_distributed(self) -> bool:
        # A launcher's world of one (torchrun --nproc_per_node=1) still takes the
        # process-group path, so a single GPU measures the same code as many.
        return self.source != "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """'gpu[03-05,07],cpu1' -> 'gpu03' (the subset of SLURM's hostlist syntax a first host needs)."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", first)
    if not match:
        return first
    prefix, ranges, suffix = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def detect(environ: Mapping[str, str] = os.environ) -> DistEnv:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(int(environ["RANK"]), int(environ.get("LOCAL_RANK", 0)), int(environ["WORLD_SIZE"]),
                       environ.get("MASTER_ADDR"), int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else None,
                       "torchrun")
    if srun_tasks(environ) > 1 and "SLURM_PROCID" in environ:
        job_id = int(environ.get("SLURM_JOB_ID", "0"))
        step_id = int(environ.get("SLURM_STEP_ID", "0") or 0)
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        # Two steps of one allocation running at once must not share a port.
        port = 15000 + (job_id * 7 + step_id) % 20000
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", 0)),
                       srun_tasks(environ), environ.get("MASTER_ADDR") or first_slurm_host(nodelist),
                       int(environ.get("MASTER_PORT", port)), "slurm")
    return DistEnv()


def srun_tasks(environ: Mapping[str, str] = os.environ) -> int:
    """Tasks of this srun step. SLURM_STEP_NUM_TASKS is set by srun only: a batch script or an
    salloc shell (which see the job's SLURM_NTASKS) is one process, not one rank of many."""
    return int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise UserError("trainer.backend=nccl needs CUDA devices; use trainer.backend=gloo (or auto) on CPU")
    return name


def init(env: DistEnv, backend: str, device: torch.device, timeout_s: float) -> None:
    """Join the process group (no-op for a single process)."""
    if not env.is_distributed or dist.is_initialized():
        return
    if env.master_addr is None or env.master_port is None:
        raise UserError("distributed run without MASTER_ADDR/MASTER_PORT; start it with torchrun, srun "
                        "or bigmodel train trainer.devices=N")
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = resolve_backend(backend, device)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))
    # One group for the life of the process: the jobs of a sweep under torchrun reuse it
    # (tearing it down and rebuilding it on the same store races between ranks).
    atexit.register(close)
    if backend == "nccl":
        check_one_gpu_per_rank(env, device, timeout_s)


def check_one_gpu_per_rank(env: DistEnv, device: torch.device, timeout_s: float) -> None:
    """NCCL needs a GPU of its own for every rank; two ranks on one would otherwise fail at
    the first collective, deep inside NCCL. The ranks compare GPU identities over gloo.
    Without a usable UUID (some virtual GPUs) every rank reports None and nothing is refused."""
    import socket

    uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "") or "")
    usable = uuid.strip("-0") != ""
    identity = (socket.gethostname(), uuid) if usable else None
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    identities: list = [None] * env.world_size
    dist.all_gather_object(identities, identity, group=group)
    dist.destroy_process_group(group)
    shared = first_shared_gpu(identities)
    if shared:
        first, second, host = shared
        raise UserError(f"ranks {first} and {second} would share one GPU on {host}, and NCCL needs a GPU per "
                        "rank; start as many ranks per node as it has GPUs (torchrun --nproc_per_node, srun "
                        "--gpus-per-task=1), or train on CPU with trainer.device=cpu")


def first_shared_gpu(identities) -> Optional[tuple]:
    """(rank, other rank, host) of the first two ranks with the same (host, GPU), or None."""
    seen: dict = {}
    for rank, identity in enumerate(identities):
        if identity is None:  # this rank's GPU has no identity to compare
            continue
        if tuple(identity) in seen:
            return seen[tuple(identity)], rank, identity[0]
        seen[tuple(identity)] = rank
    return None


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def replicate(model: nn.Module, device: torch.device, group=None) -> nn.Module:
    """DDP over the data-parallel ranks `group` (step 4 of engine/parallelize.py)."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=group)


def repeated_blocks(model: nn.Module) -> list:
    """What a model is made of, repeated: the members of its outermost ModuleLists, wherever
    they sit (bigmodel's GPT: `blocks`; Hugging Face GPT-2: `transformer.h`, BERT:
    `bert.encoder.layer`). Sharding and activation checkpointing work block by block."""
    blocks = []
    for child in model.children():
        blocks.extend(child if isinstance(child, nn.ModuleList) else repeated_blocks(child))
    return blocks


def shard_fully(model: nn.Module, dp_mesh, precision: str) -> nn.Module:
    """FSDP2 over the run mesh's "dp" dimension: shard each repeated block, then the root
    (embeddings, head, the rest). Tensor-parallel DTensors become 2-D (dp, tp) ones."""
    from torch.distributed.fsdp import fully_shard

    policy = precision_policy(precision)
    for block in repeated_blocks(model):
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    return model


def precision_policy(precision: str):
    """FSDP2's mixed precision for trainer.precision: bf16 weights in the passes, fp32 gradient
    reduction and master weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(uncompiled(model), FSDPModule)


def holds_dtensors(model: nn.Module) -> bool:
    """Whether the model's state is split across ranks (FSDP shards, tensor-parallel
    layers): its checkpoints are then sharded ones, written and read by every rank."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in uncompiled(model).parameters())


def uncompiled(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (its state-dict keys carry no `_orig_mod.` prefix)."""
    return getattr(model, "_orig_mod", model)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile and DDP wrappers; FSDP2 modules are the model itself."""
    model = uncompiled(model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps."""
    model = uncompiled(model)
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """The norm of the whole gradient (every rank's part of it), clipped to `max_norm`.

    torch's clip_grad_norm_ takes parameters of one kind: plain tensors, or DTensors of one
    layout. A tensor-parallel model mixes layouts (column- and row-wise shards, replicated
    biases) and plain tensors (its norms and embeddings, whole on every rank): each group's
    norm is made whole over the ranks by DTensor, then they are combined."""
    groups = by_layout(params)
    if len(groups) <= 1:  # one kind: torch's own, as it always was
        return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
    total = grad_norm(params, groups)
    clip_with_norm(params, max_norm, total, groups)
    return total


def by_layout(params: list) -> dict:
    """The parameters with gradients, grouped by their gradients' layout (None: plain tensors)."""
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, tuple(p.grad.placements)) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    return groups


def grad_norm(params: list, groups: Optional[dict] = None) -> torch.Tensor:
    """The 2-norm of the parameters' whole gradients (DTensors made whole over their ranks)."""
    groups = by_layout(params) if groups is None else groups
    if not groups:
        return torch.zeros(())
    norms = [full_tensor(torch.nn.utils.get_total_norm([p.grad for p in group])) for group in groups.values()]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_with_norm(params: list, max_norm: float, total: torch.Tensor, groups: Optional[dict] = None) -> None:
    """Scale the gradients by max_norm / total where that is below 1 (one layout at a time)."""
    for group in (by_layout(params) if groups is None else groups).values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard (sharing its storage), or itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def average_over_replicas(grads: list, group, replicas: int) -> None:
    """Average gradients (this rank's parts) over the data-parallel `group`, in place, in one
    all-reduce: DDP's job, done after the backward pass for what DDP cannot wrap (a model split
    by tensor parallelism, pipeline stages)."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= replicas
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2's gradient norm is one)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so evaluation and
    checkpoints see one model."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_max(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum over `group`'s ranks (all ranks by default), in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value: Any) -> list:
    """Every rank's `value`, in rank order (a one-item list in a single process)."""
    if not dist.is_initialized():
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered

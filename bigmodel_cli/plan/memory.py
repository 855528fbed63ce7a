"""Per-rank memory of a training run, from one simulated step of the unsharded model.

    single process  the simulated step as it is
    ddp             + DDP's gradient buckets (a flat copy of the gradients, kept for the run)
    tp x pp         trainer.parallel: weights, gradients, optimizer state and weight casts
                    divided by T x P, as the split divides the layers (roughly: TP keeps
                    embeddings, norms and head whole); activations divided by P only (TP
                    keeps the residual stream whole on every rank: an upper bound). Then
                    data parallelism over dp = world / (T x P) ranks, as below.
    fsdp            weights, gradients and optimizer state divided by the dp ranks;
                    + the gathered weights in use: the root's (embeddings, head: kept from
                    forward to backward) and two blocks' (the one running, the one
                    prefetched), in the compute dtype; + the gathered gradients of the
                    root during backward; under bf16 the weights are gathered in bf16, so
                    autocast's copies of them are not made

The parts do not all peak at once: forward + backward peaks with the activations and only
some gradients, the optimizer step with every gradient and the update's temporaries.
The per-rank peak is the larger of the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List

from bigmodel_cli.plan.simulate import StepMemory

#: what a plan leaves free on a GPU: the CUDA context, the caching allocator's slack, NCCL buffers
HEADROOM = 0.10


@dataclass
class Layout:
    strategy: str  # ddp | fsdp
    world_size: int
    precision: str
    tp: int = 1  # trainer.parallel.tp
    pp: int = 1  # trainer.parallel.pp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: what tensor and pipeline parallelism leave of the world."""
        return max(1, self.world_size // (self.tp * self.pp))


@dataclass
class RankMemory:
    parts: Dict[str, int]  # what is shown line by line (each at its own largest)
    peak: int  # the most held at once
    peak_in: str  # "forward/backward" or "optimizer step"
    notes: List[str] = field(default_factory=list)
    passed: int = 0  # the forward/backward peak
    updated: int = 0  # the optimizer step's peak (no activations: the batch does not change it)


def per_rank(step: StepMemory, layout: Layout) -> RankMemory:
    split = layout.tp * layout.pp
    memory = data_parallel_rank(model_split(step, layout) if split > 1 else step, layout)
    if split > 1:
        memory.notes.append(f"trainer.parallel tp={layout.tp} x pp={layout.pp} divides the model's weights, gradients "
                            f"and optimizer state by {split} (roughly; embeddings, norms and head stay whole "
                            "under TP) and activations by pp only")
    return memory


def model_split(step: StepMemory, layout: Layout) -> StepMemory:
    """What one rank of a tp x pp split holds of the whole model's step."""
    split = layout.tp * layout.pp

    def divided(parts: Dict[str, int]) -> Dict[str, int]:
        return {k: shard(v, layout.pp if k == "activations" else split) for k, v in parts.items()}

    return replace(step, parameters=shard(step.parameters, split), gradients=shard(step.gradients, split),
                   optimizer=shard(step.optimizer, split), pass_peak=divided(step.pass_peak),
                   update_peak=divided(step.update_peak), blocks=tuple(shard(b, split) for b in step.blocks))


def data_parallel_rank(step: StepMemory, layout: Layout) -> RankMemory:
    if layout.dp > 1 and layout.strategy == "fsdp":
        return fsdp_rank(step, layout)
    buckets = step.gradients if layout.dp > 1 else 0  # DDP
    passed = sum(step.pass_peak.values()) + step.optimizer + buckets
    updated = sum(step.update_peak.values()) + buckets
    parts = {"parameters": step.parameters, "gradients": step.gradients, "optimizer state": step.optimizer,
             "activations": step.pass_peak["activations"] + step.pass_peak["weight_casts"]}
    notes = []
    if buckets:
        parts["DDP gradient buckets"] = buckets
        notes.append("DDP keeps its own flat copy of the gradients for the all-reduce")
    return RankMemory(parts, max(passed, updated), "forward/backward" if passed >= updated else "optimizer step", notes,
                      passed, updated)


def fsdp_rank(step: StepMemory, layout: Layout) -> RankMemory:
    w = layout.dp
    half = layout.precision == "bf16"  # FSDP's MixedPrecisionPolicy gathers bf16 weights
    compute = 0.5 if half else 1.0
    block = max(step.blocks, default=0)
    root = step.parameters - sum(step.blocks)
    gathered = int(compute * (root + 2 * block))
    casts = 0 if half else step.pass_peak["weight_casts"]
    activations = step.pass_peak["activations"] + casts
    root_grads = int(compute * root)
    passed = (shard(step.parameters + step.optimizer, w) + shard(step.pass_peak["gradients"], w)
              + activations + gathered + root_grads)
    temporaries = step.update_peak["optimizer"] - step.optimizer + step.update_peak["activations"]
    updated = shard(step.parameters + step.gradients + step.optimizer + max(temporaries, 0), w)
    parts = {"parameters": shard(step.parameters, w), "gradients": shard(step.gradients, w),
             "optimizer state": shard(step.optimizer, w), "activations": activations,
             "FSDP gathered weights and gradients": gathered + root_grads}
    notes = [f"FSDP shards weights, gradients and optimizer state over {w} data-parallel ranks; the root's gathered "
             "weights and two blocks' stay in memory at a time"]
    return RankMemory(parts, max(passed, updated), "forward/backward" if passed >= updated else "optimizer step", notes,
                      passed, updated)


def shard(nbytes: int, world_size: int) -> int:
    return math.ceil(nbytes / world_size)


def fits(peak: int, gpu_bytes: int) -> bool:
    return peak <= (1 - HEADROOM) * gpu_bytes


def gib(nbytes: float) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:,.2f} GiB"
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:,.1f} MiB"
    return f"{nbytes / 2**10:,.1f} KiB"

"""What a model says of itself, as plain data, for the engine to read: how its layers split
over tensor-parallel ranks and how it runs as pipeline stages, by its own submodule names.
The engine turns these into parallel styles and stages and never names a model class or
attribute; a model of the user's that declares them gets tensor and pipeline parallelism
without a line outside its own file.

A model class declares, as class attributes:

    tensor_parallel = TransformerBlocks(...) or LinearPairs(...)
    pipeline_stages = PipelineStages(...), with the methods stage_input(x) -> the first
                      block's input and stage_output(h) -> the output, from the last block's
    flops = TransformerFlops(...)   FLOPs per token as MFU counts them (a decoder LM)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union


@dataclass(frozen=True)
class TransformerBlocks:
    """Tensor parallelism over attention blocks, Megatron-style. In each block of the
    ModuleList `blocks`: the fused q/k/v projection and the MLP's first layer column-wise,
    the attention's and the MLP's output projections row-wise (the block's output is whole
    again on every rank); its two norms can run on sequence shards (sequence parallelism).
    Names below are relative to a block; `*_key` name the model config's keys."""

    blocks: str = "blocks"
    qkv: str = "attn.qkv"  # fused, [q; k; v] rows, heads contiguous in each
    attn_out: str = "attn.proj"
    mlp_in: str = "mlp.fc"
    mlp_out: str = "mlp.proj"
    norms: Tuple[str, str] = ("ln_1", "ln_2")  # before the attention, before the MLP
    heads: str = "attn.n_heads"  # a block's attribute: its head count
    heads_key: str = "n_head"
    width_key: str = "n_embd"


@dataclass(frozen=True)
class LinearPairs:
    """Tensor parallelism over a stack of Linear layers in the module `container`, in pairs:
    column-wise then row-wise; with an odd number of layers the last (the head) stays whole.
    `widths_key` names the model config's list of hidden widths."""

    container: str = "net"
    widths_key: str = "hidden_sizes"


TensorParallel = Union[TransformerBlocks, LinearPairs]


@dataclass(frozen=True)
class PipelineStages:
    """How the model's repeated blocks (the ModuleList `blocks`) are cut into stages: the
    first stage also keeps `before` (modules or parameters, by attribute name) and runs
    `stage_input`, the last keeps `after` and runs `stage_output`. `layers_key` names the
    model config's number of blocks."""

    blocks: str
    before: Tuple[str, ...]
    after: Tuple[str, ...]
    layers_key: str


@dataclass(frozen=True)
class TransformerFlops:
    """FLOPs per token of a decoder language model as MFU counts them (6N + 12·L·d·T, PaLM's
    appendix B): its depth and width by the model config's keys; `positions` names a learned
    position table, whose parameters N leaves out."""

    layers_key: str
    width_key: str
    positions: Optional[str] = None


def flops_of(model_or_class: Any) -> Optional[TransformerFlops]:
    found = getattr(model_or_class, "flops", None)
    return found if isinstance(found, TransformerFlops) else None


def tensor_parallel_of(model_or_class: Any) -> Optional[TensorParallel]:
    """The tensor-parallel description of a model (or its class), None where it has none."""
    found = getattr(model_or_class, "tensor_parallel", None)
    return found if isinstance(found, (TransformerBlocks, LinearPairs)) else None


def pipeline_stages_of(model_or_class: Any) -> Optional[PipelineStages]:
    """The pipeline description of a model (or its class), None where it has none."""
    found = getattr(model_or_class, "pipeline_stages", None)
    return found if isinstance(found, PipelineStages) else None

"""Tensor parallelism: the plan a model describes (models/description.py, by its own
submodule names), turned into PyTorch's torch.distributed.tensor.parallel styles, and the
checks that a model splits across trainer.parallel.tp=T ranks. Megatron-style:

    TransformerBlocks  per block: the qkv projection and the MLP's first layer column-wise
                       (each rank computes its heads' q, k, v and its share of the MLP's
                       hidden units), the two output projections row-wise (partial sums,
                       all-reduced: the block's output is whole on every rank). Embeddings,
                       norms and the head stay whole, so the loss is computed on full logits,
                       as in one process. (gpt, transformer)
    LinearPairs        the Linear layers in pairs, column-wise then row-wise; with an odd
                       number of layers the last one (the head) stays whole. (mlp)

Sequence parallelism (trainer.parallel.sequence_parallel, TransformerBlocks): inside the
blocks, what the plan above keeps whole (the norms, dropout, residual adds) runs on each
rank's part of the sequence instead. The residual stream is a DTensor sharded on the
sequence (Shard(1)); the norms run under SequenceParallel (their weights become replicated
DTensors, whose partial gradients are summed once after backward); the column-wise layers
all-gather the sequence and the row-wise ones reduce-scatter into it instead of all-reducing.
The first planned block takes the whole embeddings and keeps its shard, the last gathers the
whole sequence back as a plain tensor, so the final norm, the head and the loss are as
before. Shards may be uneven (9 tokens over 2 ranks: 5 and 4). `block_plan(plan, i)` is one
block's styles and `sequence_edges(plan, first, last)` where the sharded stretch begins and ends.

The fused qkv projection holds q, k and v one after the other ([q; k; v] rows), so a
contiguous column shard would hand a rank q's and k's columns but not its heads'. Its
output is regathered and each rank keeps its own heads' q, k and v (one all-gather forward,
one reduce-scatter backward per block); the weights stay in their ordinary layout, so
checkpoints reshard between any meshes.

Weights become DTensors sharded over the mesh's "tp" dimension; everything else (but the
sequence-parallel blocks' residual stream) stays a plain tensor, the same on every tp rank
(they read the same batches and seed their random numbers alike). Checks run twice: from
the model config before any worker starts (engine/layout_checks.py: the model's class is
imported to read its description), and on the built model for torchrun and srun.
"""

from __future__ import annotations

import inspect
import logging
import operator
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from bigmodel_cli.dotted_path import import_or_none
from bigmodel_cli.errors import UserError
from bigmodel_cli.models.description import LinearPairs, TransformerBlocks, tensor_parallel_of

log = logging.getLogger("bigmodel")


# --------------------------------------------------------------------------- checks


def config_split_problem(model_cfg: Mapping[str, Any], tp: int) -> Optional[str]:
    """Why the model `model_cfg` describes cannot be split across `tp` ranks, or None (from
    the config alone, before anything is built)."""
    if tp == 1:
        return None
    target = str(model_cfg.get("_target_", ""))
    cls = import_or_none(target)
    plan = tensor_parallel_of(cls)
    if plan is None:
        return no_plan(target.rsplit(".", 1)[-1] or "this model", tp)
    if isinstance(plan, TransformerBlocks):
        heads = model_cfg.get(plan.heads_key, constructor_default(cls, plan.heads_key))
        return heads_problem(f"model.{plan.heads_key}", int(heads), tp, model_cfg.get(plan.width_key))
    widths = model_cfg.get(plan.widths_key, constructor_default(cls, plan.widths_key)) or []
    return widths_problem([int(w) for w in widths], tp)


def constructor_default(cls: Any, name: str) -> Any:
    """The default of the constructor argument `name` (a model config may leave it out)."""
    try:
        default = inspect.signature(cls).parameters[name].default
    except (KeyError, TypeError, ValueError):
        return None
    return None if default is inspect.Parameter.empty else default


def sequence_parallel_problem(model_cfg: Mapping[str, Any], tp: int, sequence_parallel: Optional[bool],
                              device_type: str) -> Optional[str]:
    """Why sequence parallelism, asked for by name, cannot run this model here, or None. Dropout
    on a sequence shard draws its mask from the rank's generator: DTensor offsets each shard's
    random numbers on CUDA, elsewhere every tp rank would draw the same mask for its shard.
    (Left at null, sequence parallelism is simply not used there: use_sequence_parallel.)"""
    if tp == 1 or sequence_parallel is not True or device_type == "cuda":
        return None
    if not isinstance(tensor_parallel_of(import_or_none(str(model_cfg.get("_target_", "")))), TransformerBlocks):
        return None  # no blocks, no sequence shards
    dropout = float(model_cfg.get("dropout") or 0.0)
    if dropout == 0.0:
        return None
    return (f"model.dropout={dropout} with trainer.parallel.sequence_parallel=true on {device_type} would give each "
            f"of the trainer.parallel.tp={tp} ranks the same dropout mask for its part of the sequence (DTensor "
            "offsets random numbers per shard on CUDA only); use model.dropout=0.0 or "
            "trainer.parallel.sequence_parallel=null (on where it is exact) or false")


def use_sequence_parallel(setting: Optional[bool], model: nn.Module, device_type: str, tp: int) -> bool:
    """trainer.parallel.sequence_parallel for this model here: true or false as set; null (the
    default) on for attention blocks wherever it is exact (on CUDA, or without dropout)."""
    if not isinstance(tensor_parallel_of(model), TransformerBlocks):
        return False  # no sequence to split
    use = bool(setting) if setting is not None else device_type == "cuda" or not has_dropout(model)
    if use:
        log.info("sequence parallelism: the blocks' norms and residual stream are split over the sequence "
                 "across the %d tp ranks", tp)
    elif setting is None:
        log.info("sequence parallelism off: on %s every tp rank would draw the same dropout mask for its part "
                 "of the sequence; with model.dropout=0.0 it is on", device_type)
    return use


def has_dropout(model: nn.Module) -> bool:
    """Whether any Dropout module drops (the blocks' ones run on sequence shards under it)."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def check_split(model: nn.Module, tp: int) -> None:
    """The built model splits across `tp` ranks, or one line saying why not and what would."""
    problem = split_problem(model, tp)
    if problem:
        raise UserError(problem)


def split_problem(model: nn.Module, tp: int) -> Optional[str]:
    if tp == 1:
        return None
    plan = tensor_parallel_of(model)
    if plan is None:
        return no_plan(type(model).__name__, tp)
    if isinstance(plan, LinearPairs):
        return widths_problem(linear_widths(model, plan)[:-1], tp)
    built = [block for block in getattr(model, plan.blocks) if has_submodule(block, plan.qkv)]  # (not placeholders)
    if not built:
        return None
    heads = operator.attrgetter(plan.heads)(built[0])
    return heads_problem(f"model.{plan.heads_key}", heads, tp, built[0].get_submodule(plan.qkv).in_features)


def has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def no_plan(name: str, tp: int) -> str:
    return (f"trainer.parallel.tp={tp} splits the layers of a model that describes how (model=gpt, transformer, "
            f"mlp), and {name} has no tensor-parallel plan; use trainer.parallel.tp=1 (and trainer.strategy=fsdp to shard it)")


def heads_problem(key: str, heads: int, tp: int, width: Optional[int] = None) -> Optional[str]:
    if heads % tp == 0:
        return None
    count = suggest_heads(heads, tp, width)
    other = f"a head count that is a multiple of {tp} (e.g. {key}={count}) or " if count else ""
    return (f"{key}={heads} attention heads do not split across trainer.parallel.tp={tp} ranks; use "
            f"{other}trainer.parallel.tp={largest_divisor(heads, tp)}")


def suggest_heads(heads: int, tp: int, width: Optional[int]) -> Optional[int]:
    """The multiple of `tp` nearest `heads` that also divides the model's width (when known;
    None when no multiple does)."""
    if not isinstance(width, int):
        return suggest_multiple(heads, tp)
    fits = [m for m in range(tp, width + 1, tp) if width % m == 0]
    return min(fits, key=lambda m: (abs(m - heads), m)) if fits else None


def widths_problem(widths: List[int], tp: int) -> Optional[str]:
    """The hidden widths that column-wise layers split (every other one, from the first)."""
    for index in range(0, len(widths), 2):
        if widths[index] % tp:
            fixed = list(widths)
            fixed[index] = suggest_multiple(widths[index], tp)
            return (f"model.hidden_sizes[{index}]={widths[index]} hidden units do not split across "
                    f"trainer.parallel.tp={tp} ranks; use a multiple of {tp} (e.g. model.hidden_sizes="
                    f"[{','.join(map(str, fixed))}]) or trainer.parallel.tp={largest_divisor(widths[index], tp)}")
    return None


def suggest_multiple(value: int, unit: int) -> int:
    return max(unit, round(value / unit) * unit)


def largest_divisor(value: int, limit: int) -> int:
    return max(d for d in range(1, limit + 1) if value % d == 0)


def linears(model: nn.Module, plan: LinearPairs) -> List[str]:
    """The Linear layers of the stack, by their names in `plan.container`."""
    container = model.get_submodule(plan.container)
    return [name for name, module in container.named_children() if isinstance(module, nn.Linear)]


def linear_widths(model: nn.Module, plan: LinearPairs) -> List[int]:
    container = model.get_submodule(plan.container)
    return [container.get_submodule(name).out_features for name in linears(model, plan)]


# --------------------------------------------------------------------------- plans


def tp_plan(model: nn.Module, sequence_parallel: bool = False, blocks: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """{submodule name: ParallelStyle} for `model`, from its description; with
    `sequence_parallel`, the blocks' norms and residual stream run on sequence shards. For a
    pipeline stage, of the (contiguous) `blocks` it runs only: its activations enter and leave
    it whole."""
    plan = tensor_parallel_of(model)
    if isinstance(plan, LinearPairs):  # no sequence: nothing for sequence parallelism to split
        return pairs_plan(model, plan)
    planned = list(range(len(getattr(model, plan.blocks))) if blocks is None else blocks)
    styles = {}
    for i in planned:
        styles.update(block_plan(plan, i, sequence_parallel))
    if sequence_parallel and planned:
        styles.update(sequence_edges(plan, planned[0], planned[-1]))
    return styles


def pairs_plan(model: nn.Module, plan: LinearPairs) -> Dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    names = linears(model, plan)
    styles = {}
    for first, second in zip(names[0::2], names[1::2]):
        styles[f"{plan.container}.{first}"], styles[f"{plan.container}.{second}"] = ColwiseParallel(), RowwiseParallel()
    return styles


def block_plan(plan: TransformerBlocks, i: int, sequence_parallel: bool = False) -> Dict[str, Any]:
    """Block i's styles. Under sequence parallelism the residual stream between blocks is a
    DTensor sharded on the sequence (Shard(1)): the norms run on their shard, the column-wise
    layers all-gather it, the row-wise ones reduce-scatter into it (instead of all-reducing)
    and stay DTensors, so the residual adds meet the same layout on both sides."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    p = f"{plan.blocks}.{i}."
    if not sequence_parallel:
        return {p + plan.qkv: ColwiseParallel(use_local_output=False), p + plan.attn_out: RowwiseParallel(),
                p + plan.mlp_in: ColwiseParallel(), p + plan.mlp_out: RowwiseParallel()}
    before_attention, before_mlp = plan.norms
    return {p + before_attention: SequenceParallel(),
            p + plan.qkv: ColwiseParallel(input_layouts=Shard(1), use_local_output=False),
            p + plan.attn_out: RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            p + before_mlp: SequenceParallel(),
            p + plan.mlp_in: ColwiseParallel(input_layouts=Shard(1)),
            p + plan.mlp_out: RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}


def sequence_edges(plan: TransformerBlocks, first: int, last: int) -> Dict[str, Any]:
    """Where the blocks first..last meet the whole-tensor rest of the model: the first block
    takes the (whole) embeddings and keeps this rank's sequence shard; the last one gathers
    the sequence back into a whole plain tensor for the final norm and the head."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleInputOutput, PrepareModuleOutput

    take = dict(input_layouts=Replicate(), desired_input_layouts=Shard(1))
    give = dict(output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True)
    if first == last:
        return {f"{plan.blocks}.{first}": PrepareModuleInputOutput(**take, **give)}
    return {f"{plan.blocks}.{first}": PrepareModuleInput(**take), f"{plan.blocks}.{last}": PrepareModuleOutput(**give)}


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = False,
                          blocks: Optional[Sequence[int]] = None) -> nn.Module:
    """Split `model`'s layers over `tp_mesh` (the run mesh's "tp" dimension), in place: all of
    them, or (a pipeline stage's) those of the `blocks` given; with `sequence_parallel`, also
    the blocks' norms and residual stream over the sequence."""
    from torch.distributed.tensor.parallel import parallelize_module

    check_split(model, tp_mesh.size())
    parallelize_module(model, tp_mesh, tp_plan(model, sequence_parallel, blocks))
    plan = tensor_parallel_of(model)
    if not isinstance(plan, TransformerBlocks):
        return model
    block_list = getattr(model, plan.blocks)
    for i in range(len(block_list)) if blocks is None else blocks:
        block = block_list[i]
        block.get_submodule(plan.qkv).register_forward_hook(own_heads_of(tp_mesh))
        if sequence_parallel:
            for norm in plan.norms:
                for param in block.get_submodule(norm).parameters():
                    param.register_post_accumulate_grad_hook(sum_partial_grad)
    return model


def sum_partial_grad(param: nn.Parameter) -> None:
    """A norm's weights are whole on every rank, but each rank's gradient covers only its
    sequence shard (a Partial DTensor): sum it once, when backward is done with it, rather
    than in every optimizer op that reads it. (FSDP, when applied, sums it on its own.)"""
    from torch.distributed.tensor import Partial, Replicate

    if any(isinstance(p, Partial) for p in param.grad.placements):
        param.grad = param.grad.redistribute(placements=[Replicate()])


def own_heads_of(tp_mesh):
    """A forward hook for the fused qkv projection: from its column-sharded output (a DTensor),
    this rank's heads' [q; k; v], as a plain tensor."""
    from torch.distributed.tensor import Partial, Replicate

    def own_heads(module: nn.Module, inputs: Any, output) -> torch.Tensor:
        rank, ranks = tp_mesh.get_local_rank(), tp_mesh.size()
        # Each rank's gradient covers only its heads: the sum over ranks is the full one.
        whole = output.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
        return torch.cat([part.chunk(ranks, dim=-1)[rank] for part in whole.chunk(3, dim=-1)], dim=-1)

    return own_heads

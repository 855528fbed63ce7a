"""Pipeline parallelism, the cut: a model's repeated blocks split into stages, one (or, for
the interleaved schedule, INTERLEAVED_STAGES) per pipeline rank.

The first stage runs what comes before the blocks (embeddings), the last what comes after
(final norm, head; the loss is computed there too). How a model splits, it describes itself
(models/description.py: PipelineStages, by its own attribute names, and its stage_input and
stage_output methods); this module holds the pipeline code and names no model.

Each rank keeps the whole model object, with what it does not run removed: blocks of other
stages become parameter-free placeholders in their ModuleList, and the embeddings (head)
leave every rank that holds no first (last) stage. State-dict keys are therefore the full
model's, so what the stages save together loads into the whole model in one process. A
parameter shared by the first and last stage (GPT's tied embedding and head) stays on both
ranks; its gradient is summed across them (engine/pipeline_step.py).

Order (torchtitan's): stages are cut first; then the blocks each rank owns are split over
mesh["tp"] (tensor parallelism), recomputed (activation checkpointing) and compiled; then
data parallelism: under fsdp each block and then each stage is sharded over mesh["dp"] (the
stage is the FSDP root that torch's pipelining drives), under ddp each stage's gradients are
averaged over mesh["dp"] after the step (engine/pipeline_step.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from bigmodel_cli.config import ParallelConfig, TrainerConfig
from bigmodel_cli.dotted_path import import_or_none
from bigmodel_cli.engine.distributed import precision_policy
from bigmodel_cli.engine.recompute import recomputing
from bigmodel_cli.errors import UserError
from bigmodel_cli.models.description import PipelineStages, pipeline_stages_of

log = logging.getLogger("bigmodel")

#: Stages per rank under trainer.parallel.schedule=interleaved_1f1b.
INTERLEAVED_STAGES = 2
PIPELINE_ATTRIBUTE = "_bigmodel_pipeline"  # where the cut is kept on the rank's model


# ---------------------------------------------------------------------------- stage plans


def plan_for(model_or_class: Any, name: str) -> PipelineStages:
    """The model's own description of its stages, or one line saying it has none."""
    plan = pipeline_stages_of(model_or_class)
    if plan is None:
        raise UserError(f"trainer.parallel.pp>1 cuts a model's repeated blocks into stages, and {name} has no "
                        f"stage plan (models that can: gpt, transformer); set trainer.parallel.pp=1")
    missing = [m for m in ("stage_input", "stage_output") if not callable(getattr(model_or_class, m, None))]
    if missing:
        raise UserError(f"{name} describes pipeline stages but has no {' or '.join(missing)} method (what the first "
                        "stage runs before its blocks, the last after them: docs/contributing.md); add them or set "
                        "trainer.parallel.pp=1")
    return plan


# ---------------------------------------------------------------------------- checks


def stages_per_rank(parallel: ParallelConfig) -> int:
    return INTERLEAVED_STAGES if parallel.schedule == "interleaved_1f1b" else 1


def microbatches(parallel: ParallelConfig) -> int:
    return parallel.microbatches if parallel.microbatches is not None else 2 * parallel.pp


def check_pipeline(settings: TrainerConfig, plan: PipelineStages, blocks: Optional[int],
                   batch_size: Optional[int]) -> None:
    """What makes a pipeline impossible, in one line with a setting that works: checked before
    launch (from the config) and again on each rank (from the built model)."""
    parallel = settings.parallel
    pp = parallel.pp
    if pp == 1:
        return
    if str(settings.precision) == "fp16":
        raise UserError("trainer.precision=fp16 needs one loss scale across all pipeline stages, which "
                        f"trainer.parallel.pp={pp} does not have; use trainer.precision=bf16 or fp32")
    v = stages_per_rank(parallel)
    if blocks is not None and blocks < pp * v:
        how = f"{pp} stages" if v == 1 else f"{pp} ranks x {v} stages each ({parallel.schedule})"
        fix = f"trainer.parallel.pp={max(1, blocks // v)}" if blocks >= v else "trainer.parallel.pp=1"
        also = ", or trainer.parallel.schedule=1f1b" if v > 1 and blocks >= pp else ""
        key = f"model.{plan.layers_key}"
        raise UserError(f"the model has {blocks} block{'s' if blocks != 1 else ''}, too few to cut into {how}; "
                        f"use {fix}{also}, or {key}={pp * v} or more")
    check_microbatches(parallel, batch_size)


def check_microbatches(parallel: ParallelConfig, batch_size: Optional[int]) -> None:
    m, pp = microbatches(parallel), parallel.pp
    if batch_size is not None and batch_size % m:
        raise UserError(f"data.batch_size={batch_size} does not split into trainer.parallel.microbatches={m} equal "
                        f"micro-batches; use a data.batch_size that is a multiple of {m}, or microbatches that divide "
                        f"{batch_size}")
    if parallel.schedule == "1f1b" and m < pp:
        raise UserError(f"schedule 1f1b needs at least as many micro-batches as stages: "
                        f"trainer.parallel.microbatches={m} < trainer.parallel.pp={pp}; "
                        f"use trainer.parallel.microbatches={pp} or more")
    rounds = max(1, m // pp)
    if parallel.schedule == "interleaved_1f1b" and m % rounds:
        raise UserError(f"schedule interleaved_1f1b needs trainer.parallel.microbatches to be a multiple of "
                        f"trainer.parallel.pp={pp} (or fewer than it); got {m}, use {rounds * pp}")


def check_config(model_cfg, batch_size: Optional[int], settings: TrainerConfig) -> None:
    """Before launch: the pipeline the config asks for can be built (blocks from the config)."""
    if settings.parallel.pp == 1:
        return
    target = str(model_cfg.get("_target_", ""))
    plan = plan_for(import_or_none(target), target.rsplit(".", 1)[-1])
    blocks = model_cfg.get(plan.layers_key)
    check_pipeline(settings, plan, int(blocks) if isinstance(blocks, int) else None, batch_size)


# ---------------------------------------------------------------------------- the cut


class Placeholder(nn.Module):
    """A block another stage runs: no parameters, and never called here."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline placeholder block was called; this stage does not own it")


def stage_blocks(n_blocks: int, n_stages: int) -> List[range]:
    """Block indices of each stage, as even as can be (earlier stages take the remainder:
    the last one also runs the head and the loss)."""
    base, extra = divmod(n_blocks, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append(range(start, end))
        start = end
    return bounds


class StageModule(nn.Module):
    """One stage of the cut model, as torch.distributed.pipelining runs it: the rank's model
    run from block `blocks.start` to `blocks.stop`.

    Its submodules are only what it runs (its blocks, and the modules before or after them
    on the first or last stage), the same objects as the model's: the stages of one rank own
    disjoint parameters, so each can be sharded (FSDP) as a unit of its own. The model itself
    is held as a plain attribute, for its stage_input and stage_output."""

    def __init__(self, model: nn.Module, plan: PipelineStages, index: int, n_stages: int, blocks: range):
        super().__init__()
        object.__setattr__(self, "model", model)  # (not a submodule: shared by the rank's stages)
        self.plan, self.index, self.blocks = plan, index, blocks
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        block_list = getattr(model, plan.blocks)
        self.runs = nn.ModuleList([block_list[i] for i in blocks])
        self.end_names = (plan.before if self.is_first else ()) + (plan.after if self.is_last else ())
        self.ends = nn.ModuleDict({name: getattr(model, name) for name in self.end_names
                                   if isinstance(getattr(model, name), nn.Module)})

    def loose_parameters(self) -> List[nn.Parameter]:
        """Parameters the model holds directly that this stage uses (the encoder's class token
        and position table): in no submodule, so FSDP leaves them whole."""
        return [getattr(self.model, name) for name in self.end_names
                if isinstance(getattr(self.model, name), nn.Parameter)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.stage_input(x) if self.is_first else x
        for block in self.runs:
            h = block(h)
        return self.model.stage_output(h) if self.is_last else h


@dataclass
class PipelineCut:
    """This rank's part of the pipeline: its stages (in order), and the parameters it shares
    with other ranks (names: tied across the first and last stage)."""

    stages: List[StageModule]
    n_stages: int
    pp_rank: int
    pp_size: int
    shared: Dict[str, Tuple[int, ...]]  # a parameter's name here -> the pp ranks that hold it
    tie_ranks: List[Tuple[int, ...]]  # every set of pp ranks that shares a parameter (alike on all ranks)
    # A shared parameter's name here -> its other names in the whole model (an unsplit run's
    # checkpoint keeps its optimizer state under the first: GPT's lm_head.weight under tok_emb.weight).
    aliases: Dict[str, Tuple[str, ...]] = field(default_factory=dict)

    @property
    def has_first(self) -> bool:
        return self.stages[0].is_first

    @property
    def has_last(self) -> bool:
        return self.stages[-1].is_last


def cut(model: nn.Module, parallel: ParallelConfig, pp_rank: int) -> PipelineCut:
    """Cut `model` in place into this pp rank's stages and return them (checked again here,
    for torchrun/srun runs and models whose config does not name their blocks)."""
    plan = plan_for(model, type(model).__name__)
    block_list = getattr(model, plan.blocks)
    pp, v = parallel.pp, stages_per_rank(parallel)
    n_stages = pp * v
    if len(block_list) < n_stages:
        check_pipeline(TrainerConfig(parallel=parallel), plan, len(block_list), None)
    ranges = stage_blocks(len(block_list), n_stages)
    mine = [s for s in range(n_stages) if s % pp == pp_rank]  # loop order: stage s on pp rank s % pp
    owners = owner_of_names(model, plan, ranges, pp)
    shared = shared_parameters(model, owners)
    tied = tied_names(model)  # (before the cut removes some of the names)
    owned = {i for s in mine for i in ranges[s]}
    for i in range(len(block_list)):
        if i not in owned:
            block_list[i] = Placeholder()
    keep_before, keep_after = 0 in mine, n_stages - 1 in mine
    for name in (() if keep_before else plan.before) + (() if keep_after else plan.after):
        delattr(model, name)
    stages = [StageModule(model, plan, s, n_stages, ranges[s]) for s in mine]
    here = {name: ranks for name, ranks in shared.items() if owner(name, owners) == pp_rank}
    cut_record = PipelineCut(stages, n_stages, pp_rank, pp, here, sorted(set(shared.values())),
                             {name: tuple(n for n in names if n != name) for name, names in tied.items() if name in here})
    # (A plain attribute: not a submodule, so it never shows in the state dict.)
    object.__setattr__(model, PIPELINE_ATTRIBUTE, cut_record)
    return cut_record


def owner_of_names(model: nn.Module, plan: PipelineStages, ranges: Sequence[range], pp: int) -> Dict[str, int]:
    """The pp rank that keeps each top-level name of the model after the cut."""
    last = len(ranges) - 1
    owners = {name: 0 for name in plan.before}
    owners.update({name: last % pp for name in plan.after})
    for s, blocks in enumerate(ranges):
        for i in blocks:
            owners[f"{plan.blocks}.{i}"] = s % pp
    return owners


def shared_parameters(model: nn.Module, owners: Dict[str, int]) -> Dict[str, Tuple[int, ...]]:
    """Parameters that more than one pp rank keeps (one object under several names): each
    rank's name for it -> the ranks. Refuses anything kept outside the plan's names."""
    shared: Dict[str, Tuple[int, ...]] = {}
    for names in names_by_parameter(model):
        holders = tuple(sorted({owner(name, owners) for name in names}))
        if len(holders) > 1:
            shared.update({name: holders for name in names})
    return shared


def tied_names(model: nn.Module) -> Dict[str, Tuple[str, ...]]:
    """Every name of a parameter the model holds under several names -> all its names, in order."""
    return {name: tuple(names) for names in names_by_parameter(model) if len(names) > 1 for name in names}


def names_by_parameter(model: nn.Module) -> List[List[str]]:
    names_of: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    return list(names_of.values())


def owner(name: str, owners: Dict[str, int]) -> int:
    parts = name.split(".")
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in owners:
            return owners[key]
    raise UserError(f"the model's parameter {name} is in no pipeline stage (its stage plan does not name "
                    f"{parts[0]}); set trainer.parallel.pp=1")


def cut_of(model: nn.Module) -> Optional[PipelineCut]:
    """The pipeline cut of a rank's model, or None for a model that was not cut."""
    return getattr(model, PIPELINE_ATTRIBUTE, None)


def parallelize_stages(model: nn.Module, settings: TrainerConfig, mesh, checkpoint_blocks: bool,
                       device: torch.device) -> nn.Module:
    """The pipeline path of engine/parallelize.py, in its order: cut; split the blocks this
    rank runs over mesh["tp"]; recompute and compile them (each block on its own, so state-dict
    keys stay the model's); under trainer.strategy=fsdp, shard each block and then each stage
    over mesh["dp"] (ddp: the stages' gradients are averaged in engine/pipeline_step.py)."""
    stages = cut(model, settings.parallel, mesh["pp"].get_local_rank())
    own = sorted(i for stage in stages.stages for i in stage.blocks)
    if settings.parallel.tp > 1:  # stage by stage: each stage's activations enter and leave it whole
        from bigmodel_cli.engine.tensor_parallel import apply_tensor_parallel, use_sequence_parallel

        tp = settings.parallel.tp
        sequence = use_sequence_parallel(settings.parallel.sequence_parallel, model, device.type, tp)
        for stage in stages.stages:
            apply_tensor_parallel(model, mesh["tp"], sequence, blocks=stage.blocks)
    block_list = getattr(model, stages.stages[0].plan.blocks)
    for block in (block_list[i] for i in own):
        if checkpoint_blocks:
            block.forward = recomputing(block, block.forward)
        if settings.compile:
            block.compile()
    if settings.strategy == "fsdp":
        shard_stages(stages, mesh["dp"], str(settings.precision))
    return model


def shard_stages(stages: PipelineCut, dp_mesh, precision: str) -> None:
    """FSDP2 per stage: each block a unit, then the stage (its embeddings or head) as the root
    that torch's pipelining drives: it holds back the reduce-scatter until the optimizer
    step's last micro-batch (across accumulation passes too: engine/pipeline_step.py). The
    encoder's loose parameters stay whole (their gradients are averaged as under ddp)."""
    from torch.distributed.fsdp import fully_shard


    policy = precision_policy(precision)
    for stage in stages.stages:
        for block in stage.runs:
            fully_shard(block, mesh=dp_mesh, mp_policy=policy)
        loose = set(stage.loose_parameters())
        try:  # (passed only when needed: torch < 2.7 has no ignored_params)
            fully_shard(stage, mesh=dp_mesh, mp_policy=policy, **({"ignored_params": loose} if loose else {}))
        except TypeError as err:
            raise UserError(f"trainer.strategy=fsdp over pipeline stages of {type(stage.model).__name__} needs "
                            f"torch >= 2.7 (FSDP2's ignored_params) and this is torch {torch.__version__}; "
                            "use trainer.strategy=ddp or a newer torch") from err
        log.info("pipeline: stage %d sharded over %d data-parallel ranks (fsdp)", stage.index, dp_mesh.size())

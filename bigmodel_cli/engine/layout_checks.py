"""What train, plan and lr-find refuse before anything launches: a world that does not split
into trainer.parallel's tensor x pipeline ranks, or a model that does not split over them.
(The imports stay inside the checks: the commands import this before torch, for a fast --help.)"""

from __future__ import annotations

from typing import Any, Dict

from bigmodel_cli.config import TrainerConfig
from bigmodel_cli.errors import UserError


def check_layout(settings: TrainerConfig, env, model_cfg: Dict[str, Any]) -> None:
    """Before anything launches: the world the run will have must split into trainer.parallel's
    tensor x pipeline ranks, the model into T tensor-parallel parts (heads, hidden widths), and
    sequence parallelism, where asked for, must be exact; one line naming the numbers otherwise."""
    from bigmodel_cli.engine.device import device_type
    from bigmodel_cli.engine.mesh import layout_for
    from bigmodel_cli.engine.tensor_parallel import config_split_problem, sequence_parallel_problem

    world = env.world_size if env.is_distributed else settings.devices * settings.num_nodes
    layout = layout_for(world, settings.parallel)
    problem = config_split_problem(model_cfg, layout.tp) or sequence_parallel_problem(
        model_cfg, layout.tp, settings.parallel.sequence_parallel, device_type(settings.device))
    if problem:
        raise UserError(problem)
    if layout.tp > 1 and str(settings.precision) == "fp16":  # (as with fsdp: one loss scale per shard)
        raise UserError(f"trainer.precision=fp16 with trainer.parallel.tp={layout.tp} is not supported (each rank "
                        "would skip steps on its own shard's overflow, and the ranks would diverge); use "
                        "trainer.precision=bf16")


def check_pipeline(config: Dict[str, Any], settings: TrainerConfig) -> None:
    """Before anything launches: trainer.parallel.pp>1 can cut this model (its blocks, from the
    config) with this batch and schedule (one line naming the numbers otherwise)."""
    from bigmodel_cli.engine.pipeline import check_config

    check_config(config.get("model") or {}, (config.get("data") or {}).get("batch_size"), settings)
    if settings.parallel.pp > 1 and (config.get("distill") or {}).get("teacher"):
        raise UserError(f"distill.teacher with trainer.parallel.pp={settings.parallel.pp} is not supported (a pipeline "
                        "computes its loss inside the last stage); distill with trainer.parallel.pp=1")

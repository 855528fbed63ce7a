"""`bigmodel plan` and `bigmodel train trainer.dry_run=true`: validate a train config as train
does, plan it, print the plan."""

from __future__ import annotations

from typing import Dict, Sequence

from omegaconf import DictConfig, OmegaConf

from bigmodel_cli.config import plain_config, trainer_settings
from bigmodel_cli.config_checks import validate_train_config
from bigmodel_cli.engine.layout_checks import check_layout, check_pipeline


def show_plan(cfg: DictConfig, choices: Dict[str, str], overrides: Sequence[str], gpu=None) -> None:
    """Validate `cfg` as train does, plan it, print the plan. (torch loads in the planner.)"""
    from bigmodel_cli.engine.distributed import DistEnv
    from bigmodel_cli.plan import gpus
    from bigmodel_cli.plan.planner import make_plan
    from bigmodel_cli.plan.report import print_plan

    validate_train_config(cfg)
    settings = trainer_settings(cfg)
    plain = plain_config(cfg)
    # What train would refuse before launch (a model or layout that does not split) is not planned.
    config = OmegaConf.to_container(plain)
    check_layout(settings, DistEnv(), config.get("model") or {})
    check_pipeline(config, settings)
    gpu = gpu or gpus.REQUESTED or gpus.local_gpu()
    print_plan(make_plan(plain, settings, choices, list(overrides), gpu), choices)

"""`bigmodel plan` (and `bigmodel train trainer.dry_run=true`): print the plan, train nothing."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import register_configs
from bigmodel_cli.errors import report_user_errors

register_configs()


def show_plan(cfg: DictConfig, choices: Dict[str, str], overrides: Sequence[str], gpu=None) -> None:
    """Validate `cfg` as train does, plan it, print the plan."""
    from omegaconf import OmegaConf

    from bigmodel_cli.commands.train import check_layout, check_pipeline
    from bigmodel_cli.config import plain_config, trainer_settings, validate_train_config
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="plan")
def main(cfg: DictConfig) -> Optional[float]:
    hydra_cfg = HydraConfig.get()
    report_user_errors(lambda: show_plan(cfg, dict(hydra_cfg.runtime.choices), hydra_cfg.overrides.task))
    return None

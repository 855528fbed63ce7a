"""`bigmodel plan` (and `bigmodel train trainer.dry_run=true`): print the plan, train nothing."""

from __future__ import annotations

from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import register_configs
from bigmodel_cli.error_report import report_user_errors
from bigmodel_cli.plan.show import show_plan

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="plan")
def main(cfg: DictConfig) -> Optional[float]:
    hydra_cfg = HydraConfig.get()
    report_user_errors(lambda: show_plan(cfg, dict(hydra_cfg.runtime.choices), hydra_cfg.overrides.task))
    return None

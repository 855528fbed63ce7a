"""`bigmodel compress`: prune or int8-quantize a checkpoint into a new run dir (bigmodel_cli/compress/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import register_configs
from bigmodel_cli.error_report import report_user_errors

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compress")
def main(cfg: DictConfig) -> Dict[str, Any]:
    from bigmodel_cli.compress.pipeline import compress_checkpoint

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return report_user_errors(lambda: compress_checkpoint(cfg, run_dir), run_dir=run_dir)

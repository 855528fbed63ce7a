"""`bigmodel export`: a checkpoint in another format (bigmodel_cli/export/ does the work)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import plain_config, register_configs
from bigmodel_cli.errors import UserError
from bigmodel_cli.error_report import report_user_errors

log = logging.getLogger("bigmodel")
register_configs()


def run_export(cfg: DictConfig, out: Path) -> Dict[str, Any]:
    from bigmodel_cli.export.export import REPORT_FILE, export, summary_line
    from bigmodel_cli.telemetry import write_json

    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError("no checkpoint given; run bigmodel export ckpt=<run dir or checkpoint file> format=...")
    cfg = plain_config(OmegaConf.masked_copy(cfg, ["ckpt", "format", "trusted_targets"]))
    result = export(cfg.ckpt, cfg.format, out, list(cfg.trusted_targets))
    write_json(out / REPORT_FILE, result)
    print(summary_line(result, out), flush=True)
    for note in result["notes"]:
        print(f"  {note}", flush=True)
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> Dict[str, Any]:
    out = Path(HydraConfig.get().runtime.output_dir)  # `out`, resolved once by Hydra
    return report_user_errors(lambda: run_export(cfg, out), run_dir=out)

"""`bigmodel eval`: rebuild a model from its checkpoint's config and evaluate one split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import plain_config, register_configs
from bigmodel_cli.error_report import report_user_errors
from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")
register_configs()

def print_table(title: str, metrics: Dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(title, highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.6g}")
    console.print(table)


def evaluate(cfg: DictConfig) -> Dict[str, float]:
    from bigmodel_cli.engine.device import check_precision, resolve_device
    from bigmodel_cli.build.inference import open_trained, ready_model
    from bigmodel_cli.build.trained_inputs import eval_data
    from bigmodel_cli.engine.tasks import task_for
    from bigmodel_cli.engine.trainer import evaluate_model
    from bigmodel_cli.telemetry import write_json

    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError("no checkpoint given; run bigmodel eval ckpt=<checkpoint file or run dir>")
    for key in ("batch_size", "eval_batches"):
        if cfg[key] is not None and cfg[key] <= 0:
            raise UserError(f"{key} must be > 0, or null for the default (got {cfg[key]})")
    cfg = plain_config(cfg)
    device = resolve_device(cfg.device, key="device")
    check_precision(cfg.precision, device, key="precision")
    trained = open_trained(cfg.ckpt, cfg.trusted_targets, sections=("model", "data"))
    data, data_cfg = eval_data(cfg, trained)
    model = ready_model(trained, device, data.spec)
    data.to(device)
    metrics = evaluate_model(model, data, task_for(data.spec.task), cfg.split, cfg.precision, device,
                             cfg.eval_batches)
    path, step = trained.checkpoint.path, trained.checkpoint.step
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    write_json(run_dir / "eval.json", {
        "checkpoint": str(path.absolute()), "step": step, "split": cfg.split,
        "metrics": metrics, "data": OmegaConf.to_container(data_cfg, resolve=True)})
    print_table(f"{cfg.split} split | {path} | step {step}", metrics)
    log.debug("eval.json written to %s", run_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> Dict[str, float]:
    return report_user_errors(lambda: evaluate(cfg), run_dir=Path(HydraConfig.get().runtime.output_dir))

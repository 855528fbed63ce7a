"""`bigmodel eval`: rebuild a model from its checkpoint's config and evaluate one split."""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import Precision, plain_config, register_command_schema
from bigmodel_cli.error_report import report_user_errors
from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")

# The config's schema (conf/eval.yaml starts from it): each key's type, default and, in the
# comment on or above it, its `bigmodel eval --help` description.


@dataclass
class EvalConfig:
    ckpt: str = MISSING  # the run dir (its best checkpoint, else last) or checkpoint file
    split: str = "test"  # train | val | test
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.fp32  # autocast precision of the forward passes
    batch_size: Optional[int] = None  # null: the batch size the model trained with
    eval_batches: Optional[int] = None  # cap on batches (null: the whole split)
    # Overrides merged over the checkpoint's own data config, e.g. +data.path=other.txt
    data: Dict[str, Any] = field(default_factory=dict)
    # Import paths outside bigmodel that the checkpoint's stored config may name (its own
    # model or data class, say): trusted_targets=[mypkg.nets.MyNet]. Others are refused.
    trusted_targets: List[str] = field(default_factory=list)


SCHEMA = EvalConfig
register_command_schema("eval", SCHEMA)

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

"""`bigmodel export`: a checkpoint in another format (bigmodel_cli/export/ does the work)."""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
from pathlib import Path
from typing import Any, Dict, List

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import Choice, plain_config, register_command_schema
from bigmodel_cli.errors import UserError
from bigmodel_cli.error_report import report_user_errors

log = logging.getLogger("bigmodel")

# The config's schema (conf/export.yaml starts from it): each key's type, default and, in the
# comment on or above it, its `bigmodel export --help` description.


class ExportFormat(Choice):
    safetensors = "safetensors"  # weights + bigmodel.json: bigmodel eval and a plain nn.Module load it
    torchscript = "torchscript"  # torch.jit.trace of the eval-mode model
    onnx = "onnx"  # torch.onnx.export (extra: onnx)
    hf = "hf"  # a transformers GPT2LMHeadModel folder, for the GPT models (extra: hf)


@dataclass
class ExportConfig:
    ckpt: str = MISSING  # the run dir (its best checkpoint), checkpoint file or exported folder
    format: ExportFormat = ExportFormat.safetensors  # safetensors | torchscript | onnx | hf
    # The folder written into (new, or empty); by default a new one under outputs/export/.
    out: str = "outputs/export/${now:%Y-%m-%d}/${now:%H-%M-%S-%f}"
    # Import paths outside bigmodel that the checkpoint's stored config may name: [mypkg.nets.MyNet].
    trusted_targets: List[str] = field(default_factory=list)


SCHEMA = ExportConfig
register_command_schema("export", SCHEMA)


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

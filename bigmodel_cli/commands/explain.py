"""`bigmodel explain`: attribution maps for a checkpoint's predictions, with their checks
(bigmodel_cli/explain/ does the work; this is the Hydra glue)."""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import Choice, plain_config, register_command_schema
from bigmodel_cli.config_checks import validate_explain
from bigmodel_cli.error_report import report_user_errors

log = logging.getLogger("bigmodel")

# The config's schema (conf/explain.yaml starts from it): each key's type, default and, in the
# comment on or above it, its `bigmodel explain --help` description.


class ExplainMethod(Choice):
    ig = "ig"  # integrated gradients
    saliency = "saliency"
    occlusion = "occlusion"
    lime = "lime"
    kernel_shap = "kernel_shap"
    gradient_shap = "gradient_shap"


@dataclass
class ExplainConfig:
    ckpt: str = MISSING  # the run dir (its best checkpoint, else last) or checkpoint file
    method: ExplainMethod = ExplainMethod.ig  # the attribution method (methods=[...] for several)
    # Several methods at once, compared with each other: methods=[ig,lime,kernel_shap]. Overrides method.
    methods: List[ExplainMethod] = field(default_factory=list)
    split: str = "test"  # train | val | test: where the examples come from
    num_examples: int = 16  # the first N examples of the split
    # The output explained: predicted (class or next token), true (the label), or an output index.
    target: str = "predicted"
    prompt: Optional[str] = None  # language models: explain the next-token prediction after this text
    n_steps: int = 50  # integrated gradients: steps along the path from the baseline to the input
    n_samples: int = 200  # LIME, kernel SHAP: perturbed inputs per example; gradient SHAP: samples
    batch_size: Optional[int] = None  # examples attributed together (null: the batch size it trained with)
    sanity_check: bool = True  # the model-randomisation check (runs every method again)
    seed: int = 0  # LIME's, kernel SHAP's and gradient SHAP's samples, and the re-initialised weights
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Overrides merged over the checkpoint's own data config, e.g. +data.path=other.txt
    data: Dict[str, Any] = field(default_factory=dict)
    # Import paths outside bigmodel that the checkpoint's stored config may name (its own
    # model or data class, say): trusted_targets=[mypkg.nets.MyNet]. Others are refused.
    trusted_targets: List[str] = field(default_factory=list)


SCHEMA = ExplainConfig
register_command_schema("explain", SCHEMA)


def explain(cfg: DictConfig) -> Dict[str, object]:
    from bigmodel_cli.engine.device import resolve_device
    from bigmodel_cli.explain import require_captum, session, text_view

    validate_explain(cfg)
    require_captum()
    cfg = plain_config(cfg)
    device = resolve_device(cfg.device, key="device")
    explained = session.run(cfg, device)
    if explained.spec.input_kind in ("tokens", "sequence"):
        text_view.print_console(explained)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = session.write_results(explained, cfg, run_dir)
    print_summary(summary, run_dir)
    return summary


def print_summary(summary: Dict[str, object], run_dir: Path) -> None:
    """The trust numbers in a few lines; the rest is in report.md."""
    from rich.console import Console

    from bigmodel_cli.explain.report import number

    console = Console(highlight=False, soft_wrap=True)
    found = summary.get("completeness")
    if found:
        console.print(f"completeness (integrated gradients): mean relative error {found['mean_relative_error']:.2%}, "
                      f"worst {found['max_relative_error']:.2%}")
    for pair, value in summary["agreement"].items():
        console.print(f"agreement {pair.replace('~', ' vs ')}: rank correlation {number(value)}")
    randomised = summary.get("randomisation")
    if randomised:
        values = ", ".join(f"{name} {number(m['correlation'])}" for name, m in randomised["methods"].items())
        console.print(f"model randomisation check {'passed' if randomised['passed'] else 'FAILED'} "
                      f"(trained vs re-initialised maps: {values})")
    console.print(f"report: {run_dir / 'report.md'}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="explain")
def main(cfg: DictConfig) -> Dict[str, object]:
    return report_user_errors(lambda: explain(cfg), run_dir=Path(HydraConfig.get().runtime.output_dir))

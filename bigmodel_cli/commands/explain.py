"""`bigmodel explain`: attribution maps for a checkpoint's predictions, with their checks
(bigmodel_cli/explain/ does the work; this is the Hydra glue)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bigmodel_cli.commands import CONFIG_DIR
from bigmodel_cli.config import plain_config, register_configs
from bigmodel_cli.config_checks import validate_explain
from bigmodel_cli.error_report import report_user_errors

log = logging.getLogger("bigmodel")
register_configs()


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

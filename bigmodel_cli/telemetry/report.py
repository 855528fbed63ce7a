"""A finished run's `report.md` (and `curves.png`): what ran, how it ended, how fast,
where its checkpoints are; short enough to read in a terminal."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping

log = logging.getLogger("bigmodel")


def write_curves(run_dir: Path) -> str:
    """curves.png, the best monitored step marked; without matplotlib, a line saying how to get it."""
    from bigmodel_cli.errors import UserError
    from bigmodel_cli.telemetry.plots import plot_runs
    from bigmodel_cli.telemetry.run_files import metrics_file

    if metrics_file(run_dir) is None:
        return "no curves: the jsonl and csv loggers were off"
    try:
        plot_runs([run_dir], run_dir / "curves.png")
    except UserError as err:  # matplotlib missing: the run itself is fine
        return f"no curves.png: {err}, then `bigmodel plot {run_dir}`"
    except Exception as err:  # a drawing bug must not fail a run whose results are saved
        log.warning("could not draw curves.png (%s: %s); the run's results are saved", type(err).__name__, err)
        log.debug("curves.png failed", exc_info=True)
        return "no curves.png: drawing it failed (see train.log)"
    return "![curves](curves.png)"


def throughput(run_dir: Path) -> Dict[str, float]:
    """Medians over the run's log intervals (the first one includes warm-up)."""
    from bigmodel_cli.telemetry.run_files import metrics_file, read_records

    if metrics_file(run_dir) is None:
        return {}
    records = read_records(run_dir)
    train = [r for r in records if "loss" in r][1:] or [r for r in records if "loss" in r]
    figures = {}
    for key in ("tokens_per_s", "samples_per_s", "step_ms", "data_wait", "mfu"):
        values = sorted(r[key] for r in train if key in r)
        if values:
            figures[key] = values[len(values) // 2]
    peaks = [r["peak_mem_mb"] for r in train if "peak_mem_mb" in r]
    if peaks:
        figures["peak_mem_mb"] = max(peaks)
    return figures


def write_report(run_dir: Path, cfg: Mapping[str, Any], choices: Mapping[str, str], summary: Mapping[str, Any]) -> None:
    curves = write_curves(run_dir)
    t = cfg["trainer"]
    # The device the run used (auto resolved), as `bigmodel train` logged it.
    device, world = summary.get("device") or t["device"], summary.get("world_size", 1)
    placed = f"{device.split(':')[0]} x {world} processes" if world > 1 else device
    lines: List[str] = [f"# Run {run_dir.parent.name}/{run_dir.name}", ""]
    overrides = " ".join(summary.get("overrides") or []) or "(defaults)"
    lines += [f"`bigmodel train {overrides}`", ""]
    lines += ["## Setup", "", "| | |", "| --- | --- |"]
    lines += [f"| model | {choices.get('model') or cfg['model']['_target_']} ({summary['parameters']:,} parameters) |",
              f"| data | {choices.get('data') or cfg['data']['_target_']}, batch {cfg['data']['batch_size']} per device |",
              f"| optimizer | {cfg['optim']['_target_'].rsplit('.', 1)[-1]}, lr {cfg['optim']['lr']} |",
              f"| schedule | {cfg['scheduler']['_target_'].rsplit('.', 1)[-1]} |",
              f"| trainer | {summary['steps']} steps ({summary['epochs']} epochs), {t['precision']}, device "
              f"{placed}, strategy {t['strategy']}, seed {t['seed']} |", ""]
    lines += ["## Results", "", "| metric | value |", "| --- | --- |"]
    for key, value in summary["test"].items():
        lines.append(f"| test/{key} ({summary['test_uses']}) | {value:.4g} |")
    if summary.get("best_value") is not None:
        lines.append(f"| best {summary['monitor']} | {summary['best_value']:.4g} at step {summary['best_step']} |")
    for key, value in summary.get("final_val", {}).items():
        lines.append(f"| final val/{key} | {value:.4g} |")
    if summary.get("early_stop"):
        lines.append(f"| ended early | {summary['early_stop']} |")
    lines += [f"| wall time | {summary['elapsed_s']:.1f} s |", ""]  # as the console's `done in`
    speed = throughput(run_dir)
    if speed:
        lines += ["## Throughput (median over log intervals)", "", "| | |", "| --- | --- |"]
        names = {"tokens_per_s": "tokens/s", "samples_per_s": "samples/s", "step_ms": "step time (ms)",
                 "data_wait": "time waiting for data", "mfu": "model FLOPs utilisation",
                 "peak_mem_mb": "peak memory (MiB)"}
        for key, value in speed.items():
            shown = f"{value:.1%}" if key in ("data_wait", "mfu") else f"{value:,.1f}"
            lines.append(f"| {names[key]} | {shown} |")
        lines.append("")
    folder = run_dir / "checkpoints"
    lines += ["## Files", ""]
    if folder.is_dir():
        for alias in ("best", "last"):
            for suffix in (".pt", ".dcp"):
                path = folder / f"{alias}{suffix}"
                if path.exists():
                    target = f" -> {path.resolve().name}" if path.is_symlink() else ""
                    lines.append(f"- {alias}: `checkpoints/{path.name}`{target}")
    lines += ["- metrics: `metrics.jsonl` (and any other logger's files), config: `config.yaml`", "", curves, ""]
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")

"""A run dir's files read back as plain records, safely (JSON and YAML only, nothing runs; a
damaged file reads as missing): metrics.jsonl (or .csv), summary.json, the overrides Hydra
recorded, the monitored metric and which way is better. Plots, sweep summaries and the
Optuna sweeper read runs through this."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from bigmodel_cli.errors import UserError

#: metrics for which larger is better (engine/tasks.py; kept here to stay free of torch)
LARGER_IS_BETTER = ("accuracy",)


def direction(monitor: str, mode: str = "auto") -> str:
    """Optuna's direction for a monitored metric: `maximize` or `minimize`."""
    if str(mode) in ("max", "min"):
        return "maximize" if str(mode) == "max" else "minimize"
    return "maximize" if str(monitor).partition("/")[2] in LARGER_IS_BETTER else "minimize"


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """A JSON object from disk, or None when missing or damaged (JSON only: nothing runs)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def number(value: Any) -> Optional[float]:
    """A finite number from a file, else None (a damaged file may hold anything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return value if math.isfinite(value) else None


def count(value: Any) -> Optional[int]:
    found = number(value)
    return int(found) if found is not None and found >= 0 else None


def metrics_file(run_dir: Path) -> Optional[Path]:
    """The run's metrics: metrics.jsonl, else metrics.csv (logger=[csv]), else None."""
    return next((p for p in (run_dir / "metrics.jsonl", run_dir / "metrics.csv") if p.is_file()), None)


def read_records(run_dir: Path) -> List[Dict]:
    path = metrics_file(run_dir)
    if path is None:
        raise UserError(f"{run_dir} has no metrics.jsonl (or metrics.csv); pass run dirs written by "
                        "bigmodel train (with the jsonl or csv logger, both on by default)")
    if path.suffix == ".csv":
        return read_csv_records(path)
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict):  # a damaged file may hold other JSON
            records.append(record)
    return records


def read_csv_records(path: Path) -> List[Dict]:
    """metrics.csv's rows as jsonl-like records: numbers, without the row's empty cells."""
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                record = {k: float(v) for k, v in row.items() if k and v not in ("", None)}
            except ValueError:
                continue  # a row cut short by a kill
            if "step" in record:
                records.append({**record, "step": int(record["step"])})
    return records


def has_training(run_dir: Path) -> bool:
    """Whether the dir holds a training run: metrics with at least one train record (eval,
    prepare and generate runs, and a run that failed before its first step, have none)."""
    return metrics_file(run_dir) is not None and any("loss" in r for r in read_records(run_dir))


def run_overrides(run_dir: Path) -> Optional[List[str]]:
    """The command-line overrides a run was started with (Hydra records them); None when
    the run recorded none."""
    for source in (run_dir / ".hydra" / "overrides.yaml", run_dir / "summary.json"):
        if not source.is_file():
            continue
        try:  # safe loaders only; a damaged file labels the run by its dir instead
            found = json.loads(source.read_text()).get("overrides") if source.suffix == ".json" \
                else OmegaConf.to_container(OmegaConf.load(source), resolve=False)
        except Exception:  # noqa: BLE001 - any damage: no label from it
            return None
        return [str(o) for o in found] if isinstance(found, list) else None
    return None


def monitor_setting(run_dir: Path) -> Tuple[str, bool]:
    """trainer.monitor from the run's config.yaml (val/loss without one), and whether larger is better."""
    metric, mode = "val/loss", "auto"
    if (run_dir / "config.yaml").is_file():
        try:  # a damaged config.yaml: the defaults
            cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
            metric = str(cfg["trainer"].get("monitor", metric))
            mode = str(cfg["trainer"].get("monitor_mode", mode))
        except Exception:  # noqa: BLE001
            pass
    return metric, direction(metric, mode) == "maximize"

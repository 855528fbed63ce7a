"""Where numbers go: the console, the run's log file and metrics.jsonl."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, Optional

from bigmodel_cli.telemetry.console import ProgressBar, wants_bar

log = logging.getLogger("bigmodel")


def write_json(path: Path, obj: object) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def format_metrics(metrics: Dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}" if abs(value) < 1000 else f"{key} {value:,.0f}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` (a resumed run redoes the rest), dropping any
    final test record and a line cut short by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step and not any(k.startswith("test/") for k in record):
            kept.append(line + "\n")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


class MetricsFile:
    """Append-only JSON lines, flushed per record so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: Dict[str, object]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Telemetry:
    """The engine reports here; this decides how it is shown and stored.

    Only rank 0 is `active`; the other ranks' reports go to their own log file alone.
    """

    def __init__(self, run_dir: Path, progress: str = "auto", active: bool = True):
        self.active = active
        self.metrics = MetricsFile(run_dir / "metrics.jsonl") if active else None
        self.bar: Optional[ProgressBar] = ProgressBar() if active and wants_bar(progress) else None
        self.start_time = time.perf_counter()

    def start(self, total_steps: int, done_steps: int = 0) -> None:
        self.start_time = time.perf_counter()
        if self.bar:
            self.bar.start(total_steps, done_steps)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def train(self, step: int, metrics: Dict[str, float]) -> None:
        line = f"step {step} | " + format_metrics(metrics)
        if not self.active:
            log.debug(line)
            return
        self.metrics.write({"step": step, **metrics, "elapsed_s": round(self.elapsed(), 3)})
        if self.bar:
            self.bar.update(step, metrics)
            log.debug(line)  # the bar shows it; the log file still gets it
        else:
            log.info(line)

    def eval(self, step: int, split: str, metrics: Dict[str, float]) -> None:
        named = {f"{split}/{k}": v for k, v in metrics.items()}
        if self.metrics:
            self.metrics.write({"step": step, **named, "elapsed_s": round(self.elapsed(), 3)})
        log.info(f"step {step} | " + format_metrics(named))

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
        if self.metrics:
            self.metrics.close()

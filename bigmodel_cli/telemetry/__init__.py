"""Where numbers go: the console, the run's log file and the metric sinks (telemetry/sinks.py)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from bigmodel_cli.telemetry.console import ProgressBar, wants_bar
from bigmodel_cli.telemetry.sinks import Sink
from bigmodel_cli.telemetry.time_left import human_duration

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


class Telemetry:
    """The engine reports here; this decides how it is shown and stored.

    Only rank 0 is `active`; the other ranks' reports go to their own log file alone.
    `loggers` is the config's `logger` node ({name: sink config}); `resume_step` tells the
    sinks which of their records a resumed run keeps.
    """

    def __init__(self, run_dir: Path, progress: str = "auto", active: bool = True,
                 loggers: Optional[Mapping[str, Any]] = None, resume_step: int = 0):
        self.active = active
        self.sinks: List[Sink] = []
        if active:
            configs = loggers if loggers is not None else {"jsonl": {"_target_": "bigmodel_cli.telemetry.sinks.JsonlSink"}}
            self.sinks = [build_sink(config, run_dir, resume_step) for config in configs.values()]
        self.bar: Optional[ProgressBar] = ProgressBar() if active and wants_bar(progress) else None
        self.start_time = time.perf_counter()

    def start(self, total_steps: int, done_steps: int = 0) -> None:
        self.start_time = time.perf_counter()
        if self.bar:
            self.bar.start(total_steps, done_steps)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def train(self, step: int, metrics: Dict[str, float], seconds_left: Optional[float] = None) -> None:
        line = f"step {step} | " + format_metrics(metrics)
        if seconds_left is not None and seconds_left >= 1 and not self.bar:  # the bar shows its own time remaining
            line += f" | ~{human_duration(seconds_left)} left (est.)"
        if not self.active:
            log.debug(line)
            return
        for sink in self.sinks:
            sink.train(step, {**metrics, "elapsed_s": round(self.elapsed(), 3)})
        if self.bar:
            self.bar.update(step, metrics)
            log.debug(line)  # the bar shows it; the log file still gets it
        else:
            log.info(line)

    def eval(self, step: int, split: str, metrics: Dict[str, float]) -> None:
        named = {f"{split}/{k}": v for k, v in metrics.items()}
        for sink in self.sinks:
            sink.eval(step, {**named, "elapsed_s": round(self.elapsed(), 3)})
        log.info(f"step {step} | " + format_metrics(named))

    def finish(self, hparams: Dict[str, Any], final: Dict[str, float]) -> None:
        """The run's settings and final metrics, for sinks that compare runs (TensorBoard's
        HPARAMS tab, wandb's summary)."""
        for sink in self.sinks:
            sink.finish(hparams, final)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
        for sink in self.sinks:
            sink.close()


def build_sink(config: Mapping[str, Any], run_dir: Path, resume_step: int) -> Sink:
    from bigmodel_cli.dotted_path import import_object

    settings = {k: v for k, v in dict(config).items() if k != "_target_"}
    return import_object(config["_target_"])(run_dir, resume_step, **settings)

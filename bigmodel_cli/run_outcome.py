"""How a training run ended, read back from its run dir.

A finished run leaves summary.json; one that failed, diverged or was stopped leaves
outcome.json with its one-line reason. Both are files in the run dir, so a sweep summary
finds every job's end the same way whichever launcher ran it (in this process, in a
joblib worker, in a submitit job on another node).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from bigmodel_cli.telemetry.run_files import count, number, read_json

log = logging.getLogger("bigmodel")

OUTCOME_FILE = "outcome.json"

FINISHED = "finished"
EARLY_STOPPED = "early-stopped"  # finished: trainer.early_stopping ended it
DIVERGED = "diverged"  # non-finite loss or gradients (errors.Diverged)
FAILED = "failed"
STOPPED = "stopped"  # a signal (time limit, preemption, Ctrl-C); it can be continued
RUNNING = "running"  # its run dir is locked by a live process
NO_RESULT = "no result"  # ended without a word: killed (kill -9, out of memory), or lost

#: statuses that count as a failed job of a sweep (a non-zero exit code)
FAILURES = (FAILED, NO_RESULT)


def record_outcome(run_dir: Path, status: str, reason: str) -> None:
    """Write outcome.json into an existing run dir; never raises (the error it records
    matters more than this file)."""
    from bigmodel_cli.run_lock import quiet_rank

    from bigmodel_cli.run_lock import live_holder

    run_dir = Path(run_dir)
    if quiet_rank() or not run_dir.is_dir():  # torchrun's other ranks have no run dir of their own
        return
    if live_holder(run_dir) is not None:  # another process's run (this one was refused it)
        return
    try:
        from bigmodel_cli.telemetry import write_json

        write_json(run_dir / OUTCOME_FILE, {"status": status, "reason": reason,
                                            "steps": last_step(run_dir)})
    except Exception as err:  # noqa: BLE001 - a full disk: the console line stands alone
        log.debug("could not write %s: %s", run_dir / OUTCOME_FILE, err)


@dataclass
class JobResult:
    """One training run as a sweep summary lists it."""

    run_dir: str
    overrides: List[str] = field(default_factory=list)
    status: str = NO_RESULT
    reason: str = ""
    monitor: Optional[str] = None
    maximize: Optional[bool] = None
    best: Optional[float] = None
    final: Optional[float] = None
    steps: Optional[int] = None
    time_s: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @property
    def scored(self) -> bool:
        """Finished with a monitored value: comparable with the other finished jobs (a
        diverged job's value from before it diverged is not)."""
        return self.status in (FINISHED, EARLY_STOPPED) and self.best is not None and math.isfinite(self.best)

    def override_items(self) -> Dict[str, str]:
        """The job's own overrides, {key: value} (Hydra's own and the +/~ marks left out)."""
        items = {}
        for override in self.overrides:
            key, sep, value = override.partition("=")
            if sep and not key.startswith("hydra."):
                items[key.lstrip("+~")] = value
        return items

    def label(self, keys: Sequence[str]) -> str:
        """The job as the sweep's varying `keys` name it (its run dir's name without them)."""
        items = self.override_items()
        shown = " ".join(f"{k}={items[k]}" for k in keys if k in items)
        return shown or Path(self.run_dir).name


def read_job(run_dir: Path) -> JobResult:
    """How the run in `run_dir` ended: running (its dir is locked by a live process), else
    summary.json or outcome.json, whichever is newer (a run continued after a failure),
    else no result. A damaged file reads as no result, never as an error."""
    from bigmodel_cli.telemetry.run_files import run_overrides

    job = JobResult(str(run_dir), overrides=run_overrides(run_dir) or [])
    try:
        fill_status(job, run_dir)
        fill_monitor(job, run_dir)
    except Exception as err:  # noqa: BLE001 - one unreadable job must not hide the others
        job.status, job.reason = NO_RESULT, f"unreadable: {err}"
    return job


def fill_status(job: JobResult, run_dir: Path) -> None:
    summary, outcome = run_dir / "summary.json", run_dir / OUTCOME_FILE
    newest = max((p for p in (summary, outcome) if p.is_file()), key=mtime, default=None)
    found = read_json(newest) if newest is not None else None
    if is_locked(run_dir):
        job.status, job.steps = RUNNING, last_step(run_dir)
    elif found is None:
        job.status, job.reason = NO_RESULT, "ended without a result (killed? see its train.log)"
        job.steps = last_step(run_dir)
    elif newest == summary:
        fill_finished(job, found)
    else:
        job.status = str(found.get("status", FAILED))
        job.reason = str(found.get("reason", ""))
        job.steps = count(found.get("steps"))
        if job.steps is None:
            job.steps = last_step(run_dir)


def fill_finished(job: JobResult, summary: Dict[str, Any]) -> None:
    job.status = EARLY_STOPPED if summary.get("early_stop") else FINISHED
    job.reason = str(summary.get("early_stop") or "")
    job.monitor = summary.get("monitor") if isinstance(summary.get("monitor"), str) else None
    if summary.get("monitor_mode") in ("max", "min"):
        job.maximize = summary["monitor_mode"] == "max"
    job.best = number(summary.get("best_value"))
    final_val = summary.get("final_val") if isinstance(summary.get("final_val"), dict) else {}
    if job.monitor:
        job.final = number(final_val.get(job.monitor.partition("/")[2]))
    job.steps = count(summary.get("steps"))
    job.time_s = number(summary.get("elapsed_s"))


def fill_monitor(job: JobResult, run_dir: Path) -> None:
    """For a run without summary.json: the monitored metric from its config, its best and
    last values from its metrics (a diverged run's best before it diverged)."""
    from bigmodel_cli.telemetry.run_files import metrics_file, monitor_setting, read_records

    if job.monitor is not None and job.maximize is not None:
        return
    job.monitor, job.maximize = monitor_setting(run_dir)
    if job.best is not None or metrics_file(run_dir) is None:
        return
    values = [number(r.get(job.monitor)) for r in read_records(run_dir)]
    values = [v for v in values if v is not None]
    if values:
        job.best = max(values) if job.maximize else min(values)
        job.final = values[-1]


def last_step(run_dir: Path) -> Optional[int]:
    from bigmodel_cli.telemetry.run_files import metrics_file, read_records

    if metrics_file(run_dir) is None:
        return None
    steps = [count(r.get("step")) for r in read_records(run_dir)]
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None


def is_locked(run_dir: Path) -> bool:
    from bigmodel_cli.run_lock import live_holder

    return live_holder(run_dir) is not None


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0

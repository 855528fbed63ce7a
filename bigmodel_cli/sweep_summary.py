"""One table of a sweep's jobs, best first: at the end of every `bigmodel train -m` (the
SweepSummary Hydra callback, registered in conf/train.yaml) and from `bigmodel summary`.

Every job is read from its own run dir (summary.json or outcome.json, see run_outcome.py), so
the table is the same under every launcher and sweeper: basic, joblib, submitit, Optuna.
Written next to the jobs as summary.csv, summary.json and sweep.png.
"""

from __future__ import annotations

import csv
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.experimental.callback import Callback

from bigmodel_cli.run_outcome import DIVERGED, EARLY_STOPPED, FAILURES, FINISHED, JobResult, NO_RESULT, read_job

log = logging.getLogger("bigmodel")

#: what marks a folder as a run dir (a job that failed before its first step has only .hydra)
JOB_MARKERS = (".hydra", "summary.json", "outcome.json", "config.yaml", "metrics.jsonl")
#: what marks a folder as a sweep dir (Hydra's basic sweeper, Optuna's, submitit's)
SWEEP_MARKERS = ("multirun.yaml", "optimization_results.yaml", "optuna.db", ".submitit")
#: what the other commands leave in their dirs (lr-find, eval): not training runs
OTHER_COMMANDS = ("lr_find.json", "lr_find.log", "eval.json", "eval.log")

#: the failed jobs of the last sweep this process summarised: `bigmodel` exits non-zero
LAST_SWEEP_FAILED: List[JobResult] = []


def is_job(folder: Path) -> bool:
    """A run dir; not a sweep dir (multirun.yaml, or the summary.json this module writes)."""
    from bigmodel_cli.telemetry.run_files import read_json

    if any((folder / name).exists() for name in SWEEP_MARKERS + OTHER_COMMANDS):
        return False
    if any((folder / name).exists() for name in JOB_MARKERS if name != "summary.json"):
        return True
    if not (folder / "summary.json").is_file():
        return False
    found = read_json(folder / "summary.json")
    return found is None or "jobs" not in found  # damaged: a run's, listed as without result


def find_jobs(folder: Path, depth: int = 3) -> List[Path]:
    """Run dirs in or below `folder`, in job order (0, 1, ..., 10); not below a run dir."""
    if is_job(folder):
        return [folder]
    if depth == 0:
        return []
    children = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    found: List[Path] = []
    for child in sorted(children, key=lambda p: (len(p.name), p.name)):
        found += find_jobs(child, depth - 1)
    return found


def rank(jobs: Sequence[JobResult]) -> List[JobResult]:
    """Best first: finished jobs by their monitored value (in the metric's direction), then
    the others (stopped, diverged, failed, running) in job order. A diverged job's best
    value from before it diverged never ranks it above a finished one."""
    scored = [j for j in jobs if j.scored]
    rest = [j for j in jobs if j not in scored]
    scored.sort(key=lambda j: -j.best if j.maximize else j.best)
    return scored + rest


def swept_keys(jobs: Sequence[JobResult]) -> List[str]:
    """The override keys whose value differs between jobs (what the sweep varied)."""
    values: Dict[str, set] = {}
    for job in jobs:
        for key, value in job.override_items().items():
            values.setdefault(key, set()).add(value)
    keys = [k for k, v in values.items() if len(v) > 1 or any(k not in j.override_items() for j in jobs)]
    return keys if len(jobs) > 1 else list(values)


def as_rows(jobs: Sequence[JobResult], keys: Sequence[str], out_dir: Path) -> List[Dict[str, Any]]:
    """The table's rows (summary.csv, summary.json): one per job, best first; each run dir
    relative to the summary's folder where it lies below it (the files stay true when the
    sweep dir is moved), else absolute."""
    rows = []
    for place, job in enumerate(jobs, 1):
        row = {"rank": place, "job": job.label(keys), **{k: job.override_items().get(k) for k in keys}}
        row.update(job.as_dict())
        row["run_dir"] = shown_path(Path(job.run_dir), out_dir)
        rows.append(row)
    return rows


def shown_path(run_dir: Path, out_dir: Path) -> str:
    try:
        return str(run_dir.resolve().relative_to(out_dir.resolve()))
    except ValueError:
        return str(run_dir.resolve())


def write_files(out_dir: Path, jobs: Sequence[JobResult], keys: Sequence[str]) -> None:
    from bigmodel_cli.telemetry import write_json

    rows = as_rows(jobs, keys, out_dir)
    monitor = next((j.monitor for j in jobs if j.monitor), None)
    write_json(out_dir / "summary.json", {"monitor": monitor, "swept": list(keys), "jobs": rows,
                                          "counts": status_counts(jobs)})
    columns = ["rank", "job", *keys, "status", "best", "final", "steps", "time_s", "reason", "run_dir"]
    with open(out_dir / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def status_counts(jobs: Sequence[JobResult]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    return counts


def summarize(run_dirs: Sequence[Path], out_dir: Path) -> List[JobResult]:
    """Read, rank, print and write the summary of these runs into `out_dir`."""
    from bigmodel_cli.telemetry.sweep_plot import plot_sweep

    jobs = rank([read_job(Path(d)) for d in run_dirs])
    keys = swept_keys(jobs)
    # Known before anything is shown or written, so a failure below cannot hide them.
    LAST_SWEEP_FAILED[:] = [j for j in jobs if j.status in FAILURES]
    print_table(jobs, keys)
    write_files(out_dir, jobs, keys)
    try:
        plot_sweep(out_dir / "sweep.png", jobs, keys)
    except Exception as err:  # noqa: BLE001 - a drawing failure must not hide the table
        log.warning("could not draw %s: %s", out_dir / "sweep.png", err)
    print(f"summary of {len(jobs)} job(s): {out_dir / 'summary.csv'}, summary.json, sweep.png")
    return jobs


STATUS_STYLE = {FINISHED: "green", EARLY_STOPPED: "green", DIVERGED: "yellow"}


def print_table(jobs: Sequence[JobResult], keys: Sequence[str]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    monitor = next((j.monitor for j in jobs if j.monitor), "monitored metric")
    table = Table(title=f"sweep: {len(jobs)} job(s), best {monitor} first", title_justify="left")
    for column in ("#", "overrides", "status", f"best {monitor}", "final", "steps", "time"):
        table.add_column(column, justify="right" if column in ("#", "steps", "time") else "left")
    for place, job in enumerate(jobs, 1):
        style = STATUS_STYLE.get(job.status, "red")
        table.add_row(str(place), escape(job.label(keys)), f"[{style}]{job.status}[/{style}]", shown(job.best),
                      shown(job.final), "" if job.steps is None else str(job.steps),
                      "" if job.time_s is None else f"{job.time_s:.1f}s")
    console = Console(file=sys.stdout, width=max(100, shutil.get_terminal_size().columns))
    console.print(table)
    for place, job in enumerate(jobs, 1):  # whole, below the table: a reason is one long line
        if job.reason:
            console.print(f"  #{place} {job.label(keys)}: {job.status}: {job.reason}", soft_wrap=True,
                          markup=False, highlight=False)


def shown(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4g}"


class SweepSummary(Callback):
    """At the end of a multirun: the summary of the sweep dir's jobs, and the failed ones
    remembered for the exit code (read from the job dirs, not from this process)."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from bigmodel_cli.run_lock import quiet_rank

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if quiet_rank() or not sweep_dir.is_dir():
            return
        run_dirs = find_jobs_below(sweep_dir)
        if not run_dirs:  # e.g. trainer.dry_run=true: plans, no runs
            return
        try:
            summarize(run_dirs, sweep_dir)  # sets LAST_SWEEP_FAILED first
        except Exception as err:  # noqa: BLE001 - the jobs' results stand without it
            log.warning("could not summarise the sweep in %s: %s", sweep_dir, err)
            if not LAST_SWEEP_FAILED:  # unknown: not a silent success
                LAST_SWEEP_FAILED.append(JobResult(str(sweep_dir), status=NO_RESULT,
                                                   reason=f"the sweep summary failed: {err}"))


def find_jobs_below(sweep_dir: Path) -> List[Path]:
    children = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    found: List[Path] = []
    for child in sorted(children, key=lambda p: (len(p.name), p.name)):
        found += find_jobs(child, depth=2)
    return found

"""`bigmodel summary SWEEP_DIR | RUN_DIR... [--out DIR]`: the table a multirun prints at
its end, for any sweep dir or set of run dirs (a sweep still running, an sbatch array's
runs), with summary.csv, summary.json and sweep.png written again.

Not a Hydra app: its arguments are folders, not config overrides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from bigmodel_cli.errors import UserError
from bigmodel_cli.error_report import report_user_errors


def runs_and_out(paths: List[str], out: Optional[str]) -> Tuple[List[Path], Path]:
    """The run dirs the paths name (a folder of runs for those below it), and where the
    summary goes: --out, else the one folder of runs given, else the current directory."""
    from bigmodel_cli.sweep_summary import JOB_MARKERS, find_jobs, is_job

    runs: List[Path] = []
    for name in paths:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise UserError(f"{path} does not exist or is not a directory; pass a sweep dir "
                            "(outputs/<date>/<time>_train_multirun) or run dirs")
        runs += [run for run in find_jobs(path) if run.resolve() not in {r.resolve() for r in runs}]
    if not runs:
        where = paths[0] if len(paths) == 1 else ", ".join(paths)
        raise UserError(f"no runs in {where} (no job dir with {', '.join(JOB_MARKERS[:3])}); pass a "
                        "sweep dir written by bigmodel train -m, or run dirs of bigmodel train")
    if out is not None:
        folder = Path(out).expanduser()
    elif len(paths) == 1 and Path(paths[0]).resolve() not in {r.resolve() for r in runs}:
        folder = Path(paths[0]).expanduser()
    else:
        folder = Path(".")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file; pass a folder for summary.csv, summary.json and sweep.png")
    if is_job(folder):  # its summary.json is the run's own
        raise UserError(f"{folder} is a run dir, whose summary.json is its own; write the sweep summary "
                        "elsewhere: --out <another folder>")
    folder.mkdir(parents=True, exist_ok=True)
    return runs, folder


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bigmodel summary", description=(
        "One table of a sweep's jobs, best monitored value first: overrides, status (finished, "
        "early-stopped, diverged, failed with its reason, stopped, running), best and final "
        "value, steps and time. Writes summary.csv, summary.json and sweep.png."))
    parser.add_argument("runs", nargs="+", help="a sweep dir (outputs/<date>/<time>_train_multirun), "
                        "or run dirs, or folders of them")
    parser.add_argument("--out", default=None, help="folder for the files (default: the sweep dir "
                        "given, else the current directory)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def summary() -> None:
        from bigmodel_cli.sweep_summary import summarize

        runs, out = runs_and_out(args.runs, args.out)
        summarize(runs, out)

    report_user_errors(summary)
    return 0

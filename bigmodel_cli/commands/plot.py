"""`bigmodel plot RUN_DIR [RUN_DIR ...] [--out FILE]`: one PNG with the runs' curves overlaid.

Not a Hydra app: its arguments are run dirs, not config overrides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from bigmodel_cli.errors import UserError
from bigmodel_cli.error_report import report_user_errors

#: What a run dir holds from its start on (Hydra's .hydra/, the run's log, its config, a
#: failure marker), training or not: such a folder with no training run in or below it is
#: counted as skipped; a folder without them (outputs/<date>) is only looked through.
RUN_MARKERS = (".hydra", "config.yaml", "failed.json", "metrics.jsonl", "metrics.csv", "summary.json")


def expand(paths: List[str]) -> Tuple[List[Path], int]:
    """The training runs the paths name: a run dir as given, any other folder (a sweep, a
    day of outputs/, outputs/ itself) for the training runs below it; and how many run dirs
    were passed over for holding no training records (eval, prepare or generate runs, a run
    that failed before its first step)."""
    runs: List[Path] = []
    skipped = 0
    for name in paths:
        path = Path(name)
        if not path.is_dir():
            raise UserError(f"{path} does not exist or is not a directory; pass run dirs "
                            "(outputs/<date>/<time>_train) or folders of them")
        found, passed_over = find_runs(path)
        runs += [run for run in found if run.resolve() not in {r.resolve() for r in runs}]  # named twice
        skipped += passed_over
    if not runs:
        where = args_named(paths)
        raise UserError(f"{where} no training run (metrics.jsonl or metrics.csv with a training record)"
                        f"{skipped_note(skipped, '; ')}; pass run dirs written by bigmodel train, or folders of them")
    return runs, skipped


def find_runs(folder: Path, depth: int = 4) -> Tuple[List[Path], int]:
    """Training runs in or below `folder` (job dirs in numeric order), and the run dirs
    without training records passed over."""
    from bigmodel_cli.telemetry.run_files import has_training

    if has_training(folder):
        return [folder], 0
    runs: List[Path] = []
    skipped = 0
    if depth > 0:
        children = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        for child in sorted(children, key=lambda p: (len(p.name), p.name)):
            found, passed_over = find_runs(child, depth - 1)
            runs += found
            skipped += passed_over
    # Below a run dir (checkpoints/, tensorboard/) nothing counts; a sweep dir is a folder of runs.
    if not runs and not skipped and is_run_dir(folder):
        return [], 1
    return runs, skipped


def is_run_dir(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS) or any(folder.glob("*.log"))


def args_named(paths: List[str]) -> str:
    return f"{paths[0]} holds" if len(paths) == 1 else f"none of {', '.join(paths)} holds"


def skipped_note(skipped: int, lead: str) -> str:
    if not skipped:
        return ""
    dirs = "dir" if skipped == 1 else "dirs"
    return f"{lead}skipped {skipped} run {dirs} without training records (eval/prepare/generate, or failed before training)"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bigmodel plot", description=(
        "Plot train/val loss, the validation metric and the learning rate against step for one "
        "or more run dirs (a folder, e.g. a sweep dir, stands for the training runs in it), overlaid, "
        "labelled by the overrides that differ between them, each run's best monitored value marked."))
    parser.add_argument("runs", nargs="+", help="run dirs (outputs/<date>/<time>_train) or folders of them "
                        "(a sweep dir, outputs/<date>); dirs without training records are skipped")
    parser.add_argument("--out", default="plot.png", help="the PNG to write (default: plot.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def plot() -> Tuple[int, int]:
        from bigmodel_cli.telemetry.plots import plot_runs

        out = Path(args.out)
        if out.is_dir() or out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
            raise UserError(f"--out {out} is not an image file name; use e.g. --out curves.png (.pdf, .svg)")
        runs, skipped = expand(args.runs)
        plot_runs(runs, out)
        return len(runs), skipped

    count, skipped = report_user_errors(plot)
    if skipped:
        print(skipped_note(skipped, ""))
    print(f"wrote {args.out} ({count} runs)")
    return 0

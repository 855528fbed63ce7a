"""`bigmodel plot RUN_DIR [RUN_DIR ...] [--out FILE]`: one PNG with the runs' curves overlaid.

Not a Hydra app: its arguments are run dirs, not config overrides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from bigmodel_cli.errors import UserError, report_user_errors


def expand(paths: List[str]) -> List[Path]:
    """Run dirs as given; a multirun sweep dir stands for its job dirs."""
    runs = []
    for name in paths:
        path = Path(name)
        jobs = sorted((p for p in path.iterdir() if (p / "metrics.jsonl").is_file()),
                      key=lambda p: (len(p.name), p.name)) if path.is_dir() else []
        runs.extend(jobs if jobs and not (path / "metrics.jsonl").is_file() else [path])
    return runs


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bigmodel plot", description=(
        "Plot train/val loss, the validation metric and the learning rate against step for one "
        "or more run dirs (a sweep dir stands for all its jobs), overlaid, labelled by overrides."))
    parser.add_argument("runs", nargs="+", help="run dirs (outputs/<date>/<time>_train) or sweep dirs")
    parser.add_argument("--out", default="plot.png", help="the PNG to write (default: plot.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def plot() -> int:
        from bigmodel_cli.telemetry.plots import plot_runs

        out = Path(args.out)
        if out.is_dir() or out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
            raise UserError(f"--out {out} is not an image file name; use e.g. --out curves.png (.pdf, .svg)")
        runs = expand(args.runs)
        plot_runs(runs, out)
        return len(runs)

    count = report_user_errors(plot)
    print(f"wrote {args.out} ({count} runs)")
    return 0

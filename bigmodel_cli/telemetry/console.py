"""Console output: rich on a terminal, plain lines in cluster job logs."""

from __future__ import annotations

import logging
import sys
from typing import Dict

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# One console shared by log lines and the progress bar, so lines print above the bar.
CONSOLE = Console(stderr=True)


def wants_bar(mode: str) -> bool:
    return mode == "bar" or (mode == "auto" and sys.stderr.isatty())


class ConsoleHandler(logging.Handler):
    """Logging handler for the console: rich markup-free lines via the shared console
    on a terminal, plain text on stderr otherwise (no colour codes in job logs)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if sys.stderr.isatty():
                CONSOLE.print(message, markup=False, highlight=False, soft_wrap=True)
            else:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
        except Exception:  # never let logging kill a run
            self.handleError(record)


class ProgressBar:
    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=CONSOLE, transient=False)
        self.task = None

    def start(self, total: int, completed: int = 0) -> None:
        self.task = self.progress.add_task("train", total=total, completed=completed, info="")
        self.progress.start()

    def update(self, step: int, metrics: Dict[str, float]) -> None:
        shown = {k: metrics[k] for k in ("loss", "lr", "tokens_per_s", "samples_per_s") if k in metrics}
        info = "  ".join(f"{k} {v:.3g}" if k in ("loss", "lr") else f"{k} {v:,.0f}" for k, v in shown.items())
        self.progress.update(self.task, completed=step, info=info)

    def stop(self) -> None:
        self.progress.stop()


def attach_rank_log(run_dir, rank: int, console: bool) -> None:
    """Each rank logs to <run dir>/train_rank{k}.log; rank 0 also to the console (if this
    process has no console handler yet, as in a launched worker)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "bigmodel_rank_log", False)]:
        root.removeHandler(old)  # the previous job's, in a sweep
        old.close()
    file_handler = logging.FileHandler(f"{run_dir}/train_rank{rank}.log")
    file_handler.bigmodel_rank_log = True
    file_handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    root.addHandler(file_handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.getLogger("bigmodel").setLevel(logging.DEBUG)
    if console and not any(isinstance(h, ConsoleHandler) for h in root.handlers):
        handler = ConsoleHandler(level=logging.INFO)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)

"""A command that fails before it produced anything leaves no run dir behind.

Hydra makes the run dir (and `.hydra/`, the log file) before the command's own checks
run, so a typo'd path or an impossible model/data pair would leave a time-stamped folder
holding no run, which `bigmodel plot outputs/<date>` and people then have to step over.
Only a folder that this very start created, whose training had not begun (a failure
after that, or a worker's crash, keeps its logs), and that holds nothing but start-up
files, is removed.
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
from pathlib import Path
from typing import Set

from bigmodel_cli.run_lock import CREATED_HERE, LOCK_NAME, created_here

log = logging.getLogger("bigmodel")

#: what a start writes before the first result (the log files, configs, empty logger files)
START_UP_FILES = (".hydra", LOCK_NAME, "*.log", "config.yaml", "vocab.json", "tensorboard",
                  "metrics.jsonl", "metrics.csv", "checkpoints")

#: run dirs (resolved) whose training began in this process
BEGAN: Set[str] = set()


def training_began(run_dir: Path, began: bool = True) -> None:
    key = str(Path(run_dir).resolve())
    if began:
        BEGAN.add(key)
    else:
        BEGAN.discard(key)


def began(run_dir: Path) -> bool:
    return str(Path(run_dir).resolve()) in BEGAN


def holds_results(run_dir: Path) -> bool:
    for entry in run_dir.iterdir():
        if not any(fnmatch.fnmatch(entry.name, pattern) for pattern in START_UP_FILES):
            return True
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        return True
    for name, header_lines in (("metrics.jsonl", 0), ("metrics.csv", 1)):
        path = run_dir / name
        if path.is_file():
            with path.open("rb") as lines:
                if sum(1 for _, line in zip(range(header_lines + 1), lines) if line.strip()) > header_lines:
                    return True
    return False


def discard_failed_start(run_dir: Path) -> None:
    """Remove `run_dir` if this start made it, its training never began and it holds no
    results; never raises (a failed clean-up must not hide the error that caused it)."""
    run_dir = Path(run_dir)
    try:
        if run_dir.is_dir() and not run_dir.is_symlink() and created_here(run_dir) \
                and not began(run_dir) and not holds_results(run_dir):
            shutil.rmtree(run_dir)
            log.debug("removed %s: the command failed before it wrote any result", run_dir)
            remove_empty_parents(run_dir)
    except Exception as err:  # noqa: BLE001 - e.g. a symlink loop that resolve() cannot follow
        log.debug("could not remove %s: %s", run_dir, err)


def remove_empty_parents(run_dir: Path) -> None:
    """The date folder above a removed run dir, if this start made it and it is now empty."""
    for parent in Path(run_dir).resolve().parents:
        if str(parent) not in CREATED_HERE:
            return
        try:
            parent.rmdir()  # only ever removes an empty folder
        except OSError:
            return

"""The one place that finds a checkpoint: named directly, or picked from a run dir.

    ckpt=<file or .dcp folder>     that checkpoint, checked byte for byte
    ckpt=<exported folder>         `bigmodel export format=safetensors`'s weights (engine/exported.py)
    ckpt=<run dir>                 Pick.BEST: best, else last, else the newest step entry
    trainer.resume=<run dir>       Pick.NEWEST_VALID: the newest step entry that loads intact;
    trainer.resume=auto            damaged newer ones are skipped with a warning (and, in the
                                   run's own dir, renamed aside so nothing takes them for the
                                   newest again; never deleted)
"""

from __future__ import annotations

import logging
import os
from enum import Enum
from pathlib import Path
from typing import Optional

from bigmodel_cli.engine.checkpoint import (
    Checkpoint,
    is_sharded_checkpoint,
    load_checkpoint,
)
from bigmodel_cli.engine.checkpoint_folder import (
    CHECKPOINT_DIR,
    SHARDED_SUFFIX,
    list_step_checkpoints,
)
from bigmodel_cli.engine.exported import is_exported_folder, load_exported
from bigmodel_cli.engine.files import user_path
from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")


class Pick(Enum):
    BEST = "best"  # for inference: the best by trainer.monitor, else the last, else the newest
    NEWEST_VALID = "newest valid"  # to continue training: the newest step that loads intact


def find_checkpoint(where: Path, pick: Pick = Pick.BEST, setting: str = "ckpt",
                    own_run: bool = False) -> Optional[Checkpoint]:
    """The checkpoint `where` names (a file or sharded folder), or the one `pick` chooses in a
    run dir or checkpoints folder, read and checked. `setting` names the option in messages.
    `own_run`: `where` is this run's own dir, whose damaged checkpoints may be renamed aside;
    there, finding none is None rather than an error."""
    where = where if own_run else user_path(where)  # a run's own dir is as Hydra made it
    if is_exported_folder(where):
        if pick == Pick.NEWEST_VALID:
            raise UserError(f"{setting}={where} is an exported model (weights only, no optimizer state) and "
                            f"cannot be continued; start from its weights with trainer.init_from={where}")
        return load_exported(where)
    if where.is_dir() and not is_sharded_checkpoint(where):
        if pick == Pick.NEWEST_VALID:
            folder = where / CHECKPOINT_DIR if (where / CHECKPOINT_DIR).is_dir() else where
            return newest_valid(folder, setting, own_run)
        return load_checkpoint(best_in(where, setting))
    if not where.exists():
        raise UserError(f"{setting}={where} does not exist; pass a checkpoint file or a run dir")
    return load_checkpoint(where)


def best_in(run_dir: Path, setting: str) -> Path:
    """A run dir's (or checkpoints folder's) best checkpoint, else its last, else its newest
    step entry (not yet checked)."""
    for folder in (run_dir / CHECKPOINT_DIR, run_dir):
        for name in ("best", "last"):
            for suffix in (".pt", SHARDED_SUFFIX):
                candidate = folder / f"{name}{suffix}"
                if candidate.is_file() or is_sharded_checkpoint(candidate):
                    return candidate
        steps = list_step_checkpoints(folder)
        if steps:
            return steps[-1][1]
    raise UserError(f"no checkpoint in {run_dir} (looked for {CHECKPOINT_DIR}/best.pt, last.pt and step_*.pt); "
                    f"pass {setting}=<a .pt file> or a run dir trained with trainer.save_checkpoints=true")


def newest_valid(folder: Path, setting: str, own_run: bool) -> Optional[Checkpoint]:
    """The newest step checkpoint in `folder` that loads intact. Damaged newer ones are
    skipped with a warning and, in the run's own dir, renamed aside (hidden, not deleted),
    so that later saves and pruning never take them for the newest."""
    damaged, chosen = [], None
    for _, path in reversed(list_step_checkpoints(folder)):
        try:
            chosen = load_checkpoint(path)
            break
        except UserError as err:
            log.warning("skipping damaged checkpoint %s: %s", path.name, err)
            damaged.append(path)
    if chosen is None and damaged:
        raise UserError(f"every checkpoint in {folder} is damaged; move them away to start over in this "
                        f"run dir, or pick another with {setting}=<checkpoint>")
    if chosen is None and not own_run:
        raise UserError(f"{setting}={folder.parent if folder.name == CHECKPOINT_DIR else folder}: no step_*.pt "
                        f"checkpoints in {folder}; pass a checkpoint file or a run dir that wrote checkpoints")
    for path in damaged if own_run else ():
        os.replace(path, aside_name(path))
    return chosen


def aside_name(path: Path) -> Path:
    """A hidden name for a damaged checkpoint that no earlier one set aside has taken."""
    candidate, n = path.with_name(f".{path.name}.damaged"), 1
    while candidate.exists() or candidate.is_symlink():
        candidate, n = path.with_name(f".{path.name}.damaged.{n}"), n + 1
    return candidate

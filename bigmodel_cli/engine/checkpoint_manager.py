"""When to write checkpoints, which to keep, and which one a resumed run continues from.

A run's `checkpoints/` folder holds one entry per saved step plus two aliases:

    step_00000250.pt   step_00000500.pt   (FSDP: step_00000500.dcp/ folders)
    last.pt -> step_00000500.pt           the newest
    best.pt -> step_00000250.pt           the best by trainer.monitor

Each step entry appears under its name only once it is complete (written to a hidden
temporary, fsynced, renamed), so a crash never leaves a torn entry in place of a good
one. The newest `keep_last` entries are kept, and always the best one.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from bigmodel_cli.engine import distributed
from bigmodel_cli.engine.checkpoint import (CHECKPOINT_DIR, SHARDED_SUFFIX, list_step_checkpoints,
                                           load_checkpoint, point_alias, remove_checkpoint,
                                           remove_stale_temporaries, save_checkpoint, step_checkpoint_name)
from bigmodel_cli.engine.sharded import save_sharded
from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")


class CheckpointManager:
    def __init__(self, run_dir: Path, sharded: bool, keep_last: int = 2, every_steps: Optional[int] = None,
                 every_minutes: Optional[float] = None, enabled: bool = True):
        self.folder = run_dir / CHECKPOINT_DIR
        self.sharded = sharded
        self.suffix = SHARDED_SUFFIX if sharded else ".pt"
        self.keep_last = keep_last
        self.every_steps = every_steps
        self.every_s = every_minutes * 60 if every_minutes else None
        self.enabled = enabled
        self.last_saved_step: Optional[int] = None
        self.last_saved_time = time.monotonic()
        if enabled and distributed.is_main_process():
            remove_stale_temporaries(self.folder)

    # ------------------------------------------------------------------ when
    def due_by_steps(self, step: int) -> bool:
        return self.enabled and self.every_steps is not None and step % self.every_steps == 0

    def due_by_time(self) -> bool:
        """Rank 0's clock decides (the loop shares its answer with the other ranks)."""
        return (self.enabled and self.every_s is not None
                and time.monotonic() - self.last_saved_time >= self.every_s)

    def best_path(self) -> Path:
        return self.folder / f"best{self.suffix}"

    # ------------------------------------------------------------------ writing
    def save(self, step: int, meta: Dict[str, Any], model, optimizer, is_best: bool = False) -> Optional[Path]:
        """Write the checkpoint of `step` (every rank calls this; rank 0 writes files)."""
        if not self.enabled:
            return None
        path = self.folder / step_checkpoint_name(step, self.sharded)
        main = distributed.is_main_process()
        if step != self.last_saved_step:
            if self.sharded:
                save_sharded(meta, model, optimizer, path)
            elif main:
                save_checkpoint(meta, path)
            self.last_saved_step, self.last_saved_time = step, time.monotonic()
        if main:
            point_alias(self.folder / f"last{self.suffix}", path)
            if is_best:
                point_alias(self.best_path(), path)
            self.prune()
        distributed.barrier()
        return path

    def prune(self) -> None:
        best = self.best_path()
        keep_best = best.resolve() if best.is_symlink() else None
        entries = list_step_checkpoints(self.folder)
        for _, path in entries[:-self.keep_last]:
            if path.resolve() != keep_best:
                remove_checkpoint(path)



def newest_valid_checkpoint(folder: Path, set_aside: bool = True) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest step checkpoint in `folder` that loads intact, and its contents. Damaged
    newer ones are skipped with a warning and (`set_aside`, in the run's own dir) renamed
    aside, hidden but not deleted, so that later saves and pruning never take them for
    the newest."""
    damaged = []
    chosen = None
    for _, path in reversed(list_step_checkpoints(folder)):
        try:
            state = load_checkpoint(path)
        except UserError as err:
            log.warning("skipping damaged checkpoint %s: %s", path.name, err)
            damaged.append(path)
            continue
        chosen = (path, state)
        break
    if chosen is None and damaged:
        raise UserError(f"every checkpoint in {folder} is damaged; move them away to start over in this "
                        "run dir, or pick another with trainer.resume=<checkpoint>")
    for path in damaged if set_aside else ():
        os.replace(path, aside_name(path))
    return chosen


def aside_name(path: Path) -> Path:
    """A hidden name for a damaged checkpoint that no earlier one set aside has taken."""
    candidate, n = path.with_name(f".{path.name}.damaged"), 1
    while candidate.exists() or candidate.is_symlink():
        candidate, n = path.with_name(f".{path.name}.damaged.{n}"), n + 1
    return candidate

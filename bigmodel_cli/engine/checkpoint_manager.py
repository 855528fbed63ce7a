"""When to write checkpoints, and which to keep.

A run's `checkpoints/` folder (engine/checkpoint_folder.py) holds one entry per saved
step plus the aliases last and best. Each step entry appears under its name only once it
is complete (written to a hidden temporary, fsynced, renamed), so a crash never leaves a
torn entry in place of a good one. The newest `keep_last` entries are kept, and always the best one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from bigmodel_cli.engine import distributed
from bigmodel_cli.engine.checkpoint import CheckpointRecord, save_checkpoint
from bigmodel_cli.engine.checkpoint_folder import (CHECKPOINT_DIR, SHARDED_SUFFIX, list_step_checkpoints,
                                                  point_alias, remove_checkpoint, remove_stale_temporaries,
                                                  step_checkpoint_name)
from bigmodel_cli.engine.sharded import save_sharded


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
    def save(self, step: int, record: CheckpointRecord, model, optimizer, is_best: bool = False) -> Optional[Path]:
        """Write the checkpoint of `step` (every rank calls this; rank 0 writes files): the
        record, and the state of `model` (the plain model, or the FSDP-sharded one) and
        `optimizer`."""
        if not self.enabled:
            return None
        path = self.folder / step_checkpoint_name(step, self.sharded)
        main = distributed.is_main_process()
        if step != self.last_saved_step:
            if self.sharded:
                save_sharded(record.to_state(), model, optimizer, path)
            elif main:
                save_checkpoint({**record.to_state(), "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict()}, path)
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

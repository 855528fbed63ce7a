"""A run's checkpoints/ folder: entry names, listing, aliases, removal, leftovers.

    step_00000250.pt   step_00000500.pt   (FSDP: step_00000500.dcp/ folders)
    last.pt -> step_00000500.pt           the newest
    best.pt -> step_00000250.pt           the best by trainer.monitor
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import List, Tuple

from bigmodel_cli.engine.files import atomic_write, replace_dir

CHECKPOINT_DIR = "checkpoints"
# A sharded (FSDP) checkpoint is a folder NAME.dcp (engine/sharded.py).
SHARDED_SUFFIX = ".dcp"


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Atomically make `dst` a copy of `src` (cheaper than serialising the state again)."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 20))


def step_checkpoint_name(step: int, is_sharded: bool) -> str:
    return f"step_{step:08d}{SHARDED_SUFFIX if is_sharded else '.pt'}"


STEP_PATTERN = re.compile(r"^step_(\d+)(\.pt|\.dcp)$")


def list_step_checkpoints(folder: Path) -> List[Tuple[int, Path]]:
    """Complete step checkpoints in `folder`, oldest first (temporaries start with a dot)."""
    found = []
    if folder.is_dir():
        for entry in folder.iterdir():
            match = STEP_PATTERN.match(entry.name)
            if match and not entry.is_symlink():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def point_alias(alias: Path, target: Path) -> None:
    """Make `alias` (e.g. last.pt) refer to `target`, atomically: a relative symlink
    swapped in by rename. Where links are unsupported, a copy instead."""
    tmp = alias.with_name(f".{alias.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target.name, tmp)
    except OSError:
        if target.is_dir():
            shutil.copytree(target, tmp)
            replace_dir(tmp, alias)
        else:
            copy_checkpoint(target, alias)
        return
    if alias.is_dir() and not alias.is_symlink():  # a copy from a link-less filesystem
        shutil.rmtree(alias)
    os.replace(tmp, alias)


def remove_checkpoint(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> None:
    """Drop what writes killed midway left behind (hidden .tmp files and folders)."""
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.startswith(".") and (entry.name.endswith(".tmp") or entry.name.endswith(".old")):
                remove_checkpoint(entry)

"""A checkpoint's one file on disk: a torch.save archive of one dict, marked with FORMAT,
written so that a crash at any moment leaves the old file or the new one, never a torn one.
(Reading it back, without executing anything: engine/checkpoint.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from bigmodel_cli.engine.files import atomic_write

FORMAT = "bigmodel-checkpoint/1"


def save_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """Write a checkpoint's dict to a temporary file in the same folder, fsync, then rename
    over `path`. torch.save records a CRC-32 per archive member, which `load_checkpoint` checks."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))

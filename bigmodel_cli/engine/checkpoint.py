"""Checkpoint files: written atomically, read without executing any code."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict

import torch

from bigmodel_cli.errors import UserError

FORMAT = "bigmodel-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    _atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Atomically make `dst` a copy of `src` (cheaper than serialising the state again)."""
    with open(src, "rb") as source:
        _atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 20))


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def resolve_checkpoint(path_like: str) -> Path:
    """A checkpoint file, or a run dir (its best checkpoint, else its last)."""
    path = Path(path_like).expanduser()
    if path.is_dir():
        for candidate in (path / CHECKPOINT_DIR / "best.pt", path / CHECKPOINT_DIR / "last.pt",
                          path / "best.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise UserError(f"no checkpoint in {path} (looked for {CHECKPOINT_DIR}/best.pt and last.pt); "
                        "pass ckpt=<a .pt file> or a run dir trained with trainer.save_checkpoints=true")
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass ckpt=<checkpoint file or run dir>")
    return path


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text.split(". ")[0] if text else type(err).__name__)[:200]


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass ckpt=<checkpoint file or run dir>")
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} is corrupt or truncated (not a torch.save archive); "
                        "use another checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the offending global in one line of its long message.
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "global" in ln]
        reason = lines[0] if lines else _first_sentence(err)
        raise UserError(f"refused to load {path}: it holds Python objects that could run code when "
                        f"unpickled ({reason[:200]}); only load checkpoints you trust") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: "
                        f"{_first_sentence(err)}); use another checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a bigmodel checkpoint (no '{FORMAT}' marker)")
    return state

"""Checkpoint files: written atomically, read without executing any code."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from bigmodel_cli.errors import UserError

FORMAT = "bigmodel-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
# A sharded (FSDP) checkpoint is a folder NAME.dcp: torch.distributed.checkpoint shards of
# the model and optimizer, plus META with everything else (step, config, ...).
SHARDED_SUFFIX = ".dcp"
META = "meta.pt"


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
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # as a plain open() would (mkstemp makes it owner-only)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def save_sharded(meta: Dict[str, Any], model, optimizer, path: Path) -> None:
    """Every rank writes its shards into a temporary folder that rank 0 then renames to
    `path` once all are done; a crash mid-write leaves no folder under that name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from bigmodel_cli.engine import distributed

    main = distributed.is_main_process()
    tmp = path.with_name(f".{path.name}.tmp")
    if main and tmp.exists():
        shutil.rmtree(tmp)
    distributed.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    distributed.barrier()  # every shard is on disk (DCP fsyncs its files)
    if main:
        save_checkpoint(meta, tmp / META)
        _replace_dir(tmp, path)
        _fsync_dir(path.parent)
    distributed.barrier()


def _replace_dir(new: Path, path: Path) -> None:
    if not path.exists():
        os.replace(new, path)
        return
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_sharded_training_state(model, optimizer, path: Path) -> None:
    """Fill model and optimizer from a sharded checkpoint (DCP reshards to this world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    _dcp_load(dcp, state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _dcp_load(dcp, state: Dict[str, Any], path: Path) -> None:
    import torch.distributed as dist

    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except Exception as err:  # DCP wraps every failure in its own exception types
        raise UserError(f"sharded checkpoint {path} does not fit this model or is damaged "
                        f"({type(err).__name__}: {_first_sentence(err)})") from None


def load_sharded_model(model, path: Path) -> None:
    """Fill `model` (sharded or not, any world size, or a single process) from a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    _dcp_load(dcp, state, path)
    set_model_state_dict(model, state["model"])


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file()


def step_checkpoint_name(step: int, sharded: bool) -> str:
    return f"step_{step:08d}{SHARDED_SUFFIX if sharded else '.pt'}"


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
            _replace_dir(tmp, alias)
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


def resolve_checkpoint(path_like: str) -> Path:
    """A checkpoint file or sharded folder, or a run dir (its best checkpoint, else its
    newest)."""
    path = Path(path_like).expanduser()
    if is_sharded_checkpoint(path):
        return path
    if path.is_dir():
        for folder in (path / CHECKPOINT_DIR, path):
            for name in ("best", "last"):
                for suffix in (".pt", SHARDED_SUFFIX):
                    candidate = folder / f"{name}{suffix}"
                    if candidate.is_file() or is_sharded_checkpoint(candidate):
                        return candidate
            steps = list_step_checkpoints(folder)
            if steps:
                return steps[-1][1]
        raise UserError(f"no checkpoint in {path} (looked for {CHECKPOINT_DIR}/best.pt, last.pt and step_*.pt); "
                        "pass ckpt=<a .pt file> or a run dir trained with trainer.save_checkpoints=true")
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a checkpoint file or run dir")
    return path


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text.split(". ")[0] if text else type(err).__name__)[:200]


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary code.

    For a sharded folder this is its metadata, with "sharded_dir" naming the folder; the
    weights come from `load_sharded_model`."""
    if is_sharded_checkpoint(path):
        return {**load_checkpoint(path / META, map_location), "sharded_dir": str(path)}
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass a checkpoint file or run dir")
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

"""Checkpoint files: written atomically, read without executing any code."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from bigmodel_cli.engine import sharded
from bigmodel_cli.engine.files import atomic_write, check_zip_archive, refusal_reason, replace_dir
from bigmodel_cli.errors import UserError

FORMAT = "bigmodel-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
# A sharded (FSDP) checkpoint is a folder NAME.dcp (engine/sharded.py).
SHARDED_SUFFIX = ".dcp"


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    torch.save records a CRC-32 per archive member, which `load_checkpoint` checks.
    """
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Atomically make `dst` a copy of `src` (cheaper than serialising the state again)."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 20))


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / sharded.META).is_file()


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


def load_checkpoint(path: Path, map_location: Any = "cpu", verify: bool = True) -> Dict[str, Any]:
    """A checkpoint's contents, read without executing any code (weights_only=True; for a
    sharded folder, its record with "sharded_dir" naming the folder, whose weights
    `sharded.load_model` reads). `verify` checks every byte against the CRC-32 it was
    written with, and, for a sharded folder, vets DCP's index. Anything damaged, refused or
    not a complete bigmodel checkpoint is a UserError naming the problem."""
    if is_sharded_checkpoint(path):
        record = _read_archive(path / sharded.META, map_location, verify)
        _check_record(record, path, is_sharded=True)
        if verify:
            sharded.check_folder(path, record)
        return {**record, "sharded_dir": str(path)}
    state = _read_archive(path, map_location, verify)
    _check_record(state, path, is_sharded=False)
    return state


def _read_archive(path: Path, map_location: Any, verify: bool) -> Dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass a checkpoint file or run dir")
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} is corrupt or truncated (not a torch.save archive); "
                        "use another checkpoint")
    problem = check_zip_archive(path) if verify else None
    if problem:
        raise UserError(f"checkpoint {path} is damaged ({problem}); use another checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"refused to load {path}: it holds Python objects that could run code when "
                        f"unpickled ({refusal_reason(err)}); only load checkpoints you trust") from None
    except Exception as err:  # a damaged archive fails in many ways; none of them is a bug here
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: "
                        f"{_first_sentence(err)}); use another checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a bigmodel checkpoint (no '{FORMAT}' marker)")
    return state


# What every checkpoint of `bigmodel train` holds besides its tensors, with the type of each.
RECORD = {"step": int, "epoch": (int, float), "config": dict, "choices": dict, "data": dict, "spec": dict,
          "best": dict, "scheduler": dict, "scaler": dict, "rng": list, "world_size": int,
          "data_position": dict}
WEIGHTS = {"model": dict, "optimizer": dict}  # in the file itself, unless it is sharded
TASKS = ("classification", "regression", "language_modeling")
INPUT_KINDS = ("vector", "sequence", "image", "tokens")
SPEC = {"task": str, "input_kind": str, "input_shape": (list, tuple), "num_outputs": int,
        "vocab_size": (int, type(None)), "block_size": (int, type(None))}


def _check_record(state: Dict[str, Any], path: Path, is_sharded: bool) -> None:
    problem = record_problem(state, is_sharded)
    if problem:
        raise UserError(f"checkpoint {path} is damaged or was not written by bigmodel train ({problem}); "
                        "use another checkpoint")


def record_problem(state: Dict[str, Any], is_sharded: bool) -> Optional[str]:
    """What is missing or mistyped in a checkpoint's contents, or None."""
    fields = RECORD if is_sharded else {**RECORD, **WEIGHTS}
    for key, kind in fields.items():
        if key not in state:
            return f"no '{key}'"
        if not isinstance(state[key], kind):
            return f"'{key}' is a {type(state[key]).__name__}"
    if state["step"] < 0:
        return "a negative step"
    for section in ("model", "data", "trainer"):
        if not isinstance(state["config"].get(section), dict):
            return f"no config.{section} section"
    for key, kind in SPEC.items():
        if not isinstance(state["spec"].get(key), kind):
            return f"spec.{key} is missing or a {type(state['spec'].get(key)).__name__}"
    if state["spec"]["task"] not in TASKS or state["spec"]["input_kind"] not in INPUT_KINDS:
        return f"an unknown task {str(state['spec']['task'])[:40]!r} or input kind"
    if not all(isinstance(n, int) and n > 0 for n in state["spec"]["input_shape"]):
        return "spec.input_shape is not a list of sizes"
    if not is_sharded and not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        return "'model' is not a table of tensors"
    return None

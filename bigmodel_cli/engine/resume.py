"""Starting from a checkpoint: what may change on resume, and loading weights to fine-tune."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from bigmodel_cli.engine.checkpoint import (CHECKPOINT_DIR, is_sharded_checkpoint, load_checkpoint, resolve_checkpoint)
from bigmodel_cli.engine.weights import load_weights
from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")

# Config sections a resumed run must share with its checkpoint: they fix the shapes of the
# weights and optimizer state, and what the data position means.
FIXED_SECTIONS = ("model", "data")
# The data position is derived from step x accumulation, so accumulation is fixed too.
FIXED_KEYS = ("optim._target_", "trainer.grad_accum_steps")
# Keys inside those sections that only change how fast, never what, the run computes.
FREE_KEYS = ("data.prefetch",)
# Naming the starting point is not a change of the run.
IGNORED_KEYS = ("trainer.resume", "trainer.init_from")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """Refuse changes that cannot continue a run; return the others, as "key: old -> new"."""
    old, new = flatten(saved), flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in IGNORED_KEYS)
    fixed = [k for k in changed
             if (k.split(".")[0] in FIXED_SECTIONS and k not in FREE_KEYS) or k in FIXED_KEYS]
    if fixed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in fixed[:4])
        more = f" and {len(fixed) - 4} more" if len(fixed) > 4 else ""
        raise UserError(f"cannot resume: the checkpoint was trained with a different {shown}{more}; "
                        "use the checkpoint's settings, or trainer.resume=none (a new run) or "
                        "trainer.init_from=<checkpoint> (its weights, fresh optimizer)")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


def starting_checkpoint(resume: str, run_dir: Path, env) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """The checkpoint a run continues from (trainer.resume), and its contents; (None, None)
    for a fresh start. Collective: rank 0 picks and checks every byte, every rank loads."""
    from bigmodel_cli.engine import distributed
    from bigmodel_cli.engine.checkpoint_manager import newest_valid_checkpoint

    if resume == "none":
        return None, None
    found, error = None, None
    if env.is_main:
        try:
            found = (newest_valid_checkpoint(run_dir / CHECKPOINT_DIR) if resume == "auto"
                     else named_checkpoint(resume))
        except UserError as err:
            error = str(err)
    choice, error = distributed.broadcast_from_main((str(found[0]) if found else None, error))
    if error:
        raise UserError(error)
    if choice is None:
        return None, None
    return Path(choice), (found[1] if env.is_main else load_checkpoint(Path(choice), verify=False))


def named_checkpoint(resume: str) -> Tuple[Path, Dict[str, Any]]:
    """trainer.resume=<checkpoint or run dir>: that checkpoint, or the run dir's newest good
    one (damaged ones are skipped, and left where they are: the run dir is not ours)."""
    from bigmodel_cli.engine.checkpoint_manager import newest_valid_checkpoint

    path = Path(resume).expanduser()
    if path.is_dir() and not is_sharded_checkpoint(path):
        folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        found = newest_valid_checkpoint(folder, set_aside=False)
        if found is None:
            raise UserError(f"trainer.resume={resume}: no step_*.pt checkpoints in {folder}; "
                            "pass a checkpoint file or a run dir that wrote checkpoints")
        return found
    if not path.exists():
        raise UserError(f"trainer.resume={resume} does not exist; use auto, none, a checkpoint or a run dir")
    return path, load_checkpoint(path)


def hyperparameters(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, fresh: List[Dict[str, Any]]) -> None:
    """After loading optimizer and schedule state, let this run's config decide the
    hyperparameters (lr, weight decay, ...) and the schedule; for an unchanged config this
    reproduces the saved values exactly."""
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update({k: v for k, v in settings.items() if k != "lr"})
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def load_initial_weights(model: nn.Module, source: str) -> Path:
    """trainer.init_from: copy another run's weights into `model` (optimizer and step stay
    fresh). Keys or shapes that differ are named in the error."""
    path = resolve_checkpoint(source)
    load_weights(model, load_checkpoint(path), path)
    return path

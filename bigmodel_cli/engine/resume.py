"""Starting from a checkpoint: what may change on resume, and loading weights to fine-tune."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from bigmodel_cli.engine import distributed
from bigmodel_cli.engine.checkpoint import Checkpoint, load_checkpoint, load_weights
from bigmodel_cli.engine.find_checkpoint import Pick, find_checkpoint
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
# Optimizer settings that torch's LR schedulers change as they step (OneCycleLR and CyclicLR
# cycle the momentum, or Adam's first beta): on resume these come from the checkpoint.
TORCH_SCHEDULER_DRIVES = ("lr", "initial_lr", "momentum", "betas", "max_lr", "max_momentum", "base_momentum")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                   replicas: Tuple[int, int] = (1, 1)) -> List[str]:
    """Refuse changes that cannot continue a run; return the others, as "key: old -> new".
    `replicas`: the data-parallel replicas then and now. data.batch_size may change with
    them when the global batch stays (a tp=2 run resumed on 2 DDP ranks at half the batch):
    every step then reads the same samples."""
    old, new = flatten(saved), flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in IGNORED_KEYS)
    fixed = [k for k in changed
             if (k.split(".")[0] in FIXED_SECTIONS and k not in FREE_KEYS) or k in FIXED_KEYS]
    batch = "data.batch_size"
    if batch in fixed and isinstance(old.get(batch), int) and isinstance(new.get(batch), int) \
            and old[batch] * replicas[0] == new[batch] * replicas[1]:
        fixed.remove(batch)
    if fixed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in fixed[:4])
        more = f" and {len(fixed) - 4} more" if len(fixed) > 4 else ""
        raise UserError(f"cannot resume: the checkpoint was trained with a different {shown}{more}; "
                        "use the checkpoint's settings, or trainer.resume=none (a new run) or "
                        "trainer.init_from=<checkpoint> (its weights, fresh optimizer)")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


def starting_checkpoint(resume: str, run_dir: Path, env) -> Optional[Checkpoint]:
    """The checkpoint a run continues from (trainer.resume), or None for a fresh start.
    Collective: rank 0 finds it and checks every byte, then every rank loads it."""
    if resume == "none":
        return None
    found, error = None, None
    if env.is_main:
        try:
            found = (find_checkpoint(run_dir, Pick.NEWEST_VALID, own_run=True) if resume == "auto" else
                     find_checkpoint(Path(resume), Pick.NEWEST_VALID, setting="trainer.resume"))
        except UserError as err:
            error = str(err)
    choice, error = distributed.broadcast_from_main((str(found.path) if found else None, error))
    if error:
        raise UserError(error)
    if choice is None or env.is_main:
        return found
    return load_checkpoint(Path(choice), verify=False)


def hyperparameters(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, fresh: List[Dict[str, Any]]) -> None:
    """After loading optimizer and schedule state, let this run's config decide the
    hyperparameters (lr, weight decay, ...) and bigmodel's schedule; for an unchanged config
    this reproduces the saved values exactly."""
    lambda_lr = isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    # A torch scheduler continues from its own saved state, and the values it drives with it.
    driven = ("lr",) if lambda_lr else TORCH_SCHEDULER_DRIVES
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update({k: v for k, v in settings.items() if k not in driven})
    if not lambda_lr:
        return
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def load_initial_weights(model: nn.Module, source: str) -> Path:
    """trainer.init_from: copy another run's weights into `model` (optimizer and step stay
    fresh). Keys or shapes that differ are named in the error."""
    checkpoint = find_checkpoint(Path(source), Pick.BEST, setting="trainer.init_from")
    load_weights(model, checkpoint)
    return checkpoint.path

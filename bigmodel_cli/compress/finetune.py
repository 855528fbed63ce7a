"""A short fine-tune of a compressed model on its checkpoint's own training data, with the
engine's Trainer: the checkpoint's optimizer and trainer settings, a constant learning
rate, on the CPU, no checkpoints written (the compressed one is written afterwards).
Its metrics land in <run dir>/finetune/metrics.jsonl."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bigmodel_cli.data.base import DataModule

log = logging.getLogger("bigmodel")

#: the trainer settings a fine-tune takes whatever the checkpoint trained with
FINETUNE_TRAINER = {"device": "cpu", "precision": "fp32", "max_epochs": None, "val_at_start": False,
                    "save_checkpoints": False, "resume": "none", "init_from": None, "devices": 1,
                    "num_nodes": 1, "compile": False, "dry_run": False, "early_stopping": {"patience": None}}


def finetune_settings(stored: DictConfig, steps: int, threads: int):
    from bigmodel_cli.config import trainer_settings

    trainer = OmegaConf.merge(stored.trainer, FINETUNE_TRAINER, {
        "max_steps": steps, "val_every": steps, "log_every": max(1, min(int(stored.trainer.log_every), steps)),
        "threads": str(threads)})
    return trainer_settings(OmegaConf.create({"trainer": trainer}))


def finetune(model: nn.Module, stored: DictConfig, data: DataModule, steps: int, lr: Optional[float],
             threads: int, run_dir: Path) -> Dict[str, float]:
    """Train `model` in place for `steps` optimizer steps; returns its validation metrics.
    Pruning masks registered on the model stay applied on every forward pass."""
    from bigmodel_cli.build import build_optimizer, build_schedule
    from bigmodel_cli.engine.device import seed_everything
    from bigmodel_cli.engine.tasks import task_for
    from bigmodel_cli.engine.trainer import RunContext, Trainer, TrainingParts
    from bigmodel_cli.telemetry import Telemetry

    settings = finetune_settings(stored, steps, threads)
    seed_everything(settings.seed)
    optim_cfg = OmegaConf.merge(stored.optim, {"lr": lr} if lr is not None else {})
    schedule = partial(build_schedule, OmegaConf.create({"_target_": "bigmodel_cli.optim.Constant"}))
    parts = TrainingParts(model, build_optimizer(optim_cfg, model), schedule, data, task_for(data.spec.task))
    folder = run_dir / "finetune"
    folder.mkdir(parents=True, exist_ok=True)
    telemetry = Telemetry(folder, settings.progress)
    try:
        trainer = Trainer(parts, settings, RunContext(folder, telemetry, torch.device("cpu")))
        log.info("fine-tune: %s at lr %.3g", trainer.describe(), trainer.last_lr)
        result = trainer.fit()
    finally:
        telemetry.close()
    model.eval()
    return result.val

"""Builder mode `finetune`: a Trainer for a short fine-tune of a model already in memory
(`bigmodel compress` retrains a pruned model): the checkpoint's own optimizer and trainer
settings, a constant learning rate, on the CPU, no checkpoints written, its metrics in the
given folder."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bigmodel_cli.build.parts import build_optimizer, build_schedule
from bigmodel_cli.config import TrainerConfig, trainer_settings
from bigmodel_cli.data.base import DataModule
from bigmodel_cli.engine.device import seed_everything
from bigmodel_cli.engine.tasks import task_for
from bigmodel_cli.engine.trainer import RunContext, Trainer, TrainingParts
from bigmodel_cli.telemetry import Telemetry

#: the trainer settings a fine-tune takes whatever the checkpoint trained with
FINETUNE_TRAINER = {"device": "cpu", "precision": "fp32", "max_epochs": None, "val_at_start": False,
                    "save_checkpoints": False, "resume": "none", "init_from": None, "devices": 1,
                    "num_nodes": 1, "compile": False, "dry_run": False, "early_stopping": {"patience": None}}
CONSTANT_LR = {"_target_": "bigmodel_cli.optim.Constant"}


def finetune_settings(stored: DictConfig, steps: int, threads: int) -> TrainerConfig:
    trainer = OmegaConf.merge(stored.trainer, FINETUNE_TRAINER, {
        "max_steps": steps, "val_every": steps, "log_every": max(1, min(int(stored.trainer.log_every), steps)),
        "threads": str(threads)})
    return trainer_settings(OmegaConf.create({"trainer": trainer}))


def build_finetune(model: nn.Module, stored: DictConfig, data: DataModule, steps: int, lr: Optional[float],
                   threads: int, folder: Path) -> Tuple[Trainer, Telemetry]:
    """A Trainer for `steps` optimizer steps of `model` (trained in place) on `data`, with the
    stored config's optimizer (at `lr` if given), and its Telemetry writing into `folder`;
    the caller fits and closes the telemetry."""
    settings = finetune_settings(stored, steps, threads)
    seed_everything(settings.seed)
    optim_cfg = OmegaConf.merge(stored.optim, {"lr": lr} if lr is not None else {})
    schedule = partial(build_schedule, OmegaConf.create(CONSTANT_LR))
    parts = TrainingParts(model, build_optimizer(optim_cfg, model), schedule, data, task_for(data.spec.task))
    folder.mkdir(parents=True, exist_ok=True)
    telemetry = Telemetry(folder, settings.progress)
    try:
        return Trainer(parts, settings, RunContext(folder, telemetry, torch.device("cpu"))), telemetry
    except BaseException:
        telemetry.close()
        raise

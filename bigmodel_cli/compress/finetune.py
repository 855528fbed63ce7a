"""A short fine-tune of a compressed model on its checkpoint's own training data, with the
Trainer the builder makes for it (build/finetune.py): the checkpoint's optimizer and trainer
settings, a constant learning rate, on the CPU, no checkpoints written (the compressed one is
written afterwards). Its metrics land in <run dir>/finetune/metrics.jsonl."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

from omegaconf import DictConfig
from torch import nn

from bigmodel_cli.build.finetune import build_finetune
from bigmodel_cli.data.base import DataModule

log = logging.getLogger("bigmodel")


def finetune(model: nn.Module, stored: DictConfig, data: DataModule, steps: int, lr: Optional[float],
             threads: int, run_dir: Path) -> Dict[str, float]:
    """Train `model` in place for `steps` optimizer steps; returns its validation metrics.
    Pruning masks registered on the model stay applied on every forward pass."""
    trainer, telemetry = build_finetune(model, stored, data, steps, lr, threads, run_dir / "finetune")
    try:
        log.info("fine-tune: %s at lr %.3g", trainer.describe(), trainer.last_lr)
        result = trainer.fit()
    finally:
        telemetry.close()
    model.eval()
    return result.val

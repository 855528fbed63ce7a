"""The compressed checkpoint: an ordinary bigmodel checkpoint beside the input one's
record, with the compressed weights, the model config that rebuilds them and a
`compression` section saying what was done (and, for int8, which layers)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Mapping

import torch

from bigmodel_cli.engine.checkpoint import Checkpoint, CheckpointRecord, save_checkpoint
from bigmodel_cli.engine.checkpoint_folder import CHECKPOINT_DIR

#: where in its run dir: `bigmodel eval ckpt=<run dir>` finds it there
FILE_NAME = "last.pt"


def save_compressed(source: Checkpoint, model_config: Mapping[str, Any], compression: Mapping[str, Any],
                    weights: Mapping[str, torch.Tensor], run_dir: Path) -> Path:
    """Write the compressed checkpoint into `run_dir` (the source is only read). No
    optimizer state: the checkpoint is for inference, or for fine-tuning afresh."""
    config: Dict[str, Any] = copy.deepcopy(source.config)
    config["model"] = dict(model_config)
    config["compression"] = dict(compression)
    state = {**CheckpointRecord.to_state(source), "config": config, "model": dict(weights), "optimizer": {}}
    path = run_dir / CHECKPOINT_DIR / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, path)
    return path


def size_on_disk(path: Path) -> int:
    """A checkpoint file's size, or a sharded checkpoint folder's total."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size

"""An exported model folder (`bigmodel export format=safetensors`) read as a checkpoint.

The folder holds `model.safetensors` (the weights; a weight tied to another, GPT's LM
head, is stored once) and `bigmodel.json`: what rebuilds the model (its config, the data's
spec and state: vocabulary, tokenizer, labels) and which weights are tied. Both are data:
the JSON is parsed, never executed; safetensors holds tensors only. The stored config's
`_target_`s are vetted like a checkpoint's (build/inference.py -> trust.py), and the
record is checked by the same rules as a checkpoint's (`record_problem`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

from bigmodel_cli.engine.checkpoint import Checkpoint, checkpoint_from_state, record_problem
from bigmodel_cli.errors import UserError

EXPORT_FORMAT = "bigmodel-export/1"
RECORD_FILE = "bigmodel.json"
WEIGHTS_FILE = "model.safetensors"
#: what the record carries of a checkpoint's (the rest is training state an export drops)
RECORD_KEYS = ("step", "epoch", "config", "choices", "data", "spec")
#: the training state of a checkpoint record, empty in an export
NO_TRAINING_STATE = {"best": {}, "scheduler": {}, "scaler": {}, "rng": [], "world_size": 1,
                     "data_position": {}, "optimizer": {}}


def is_exported_folder(path: Path) -> bool:
    return path.is_dir() and (path / RECORD_FILE).is_file()


def load_exported(folder: Path) -> Checkpoint:
    """The exported folder as a Checkpoint with its weights and no training state."""
    record = read_record(folder / RECORD_FILE)
    weights = read_weights(folder / WEIGHTS_FILE)
    tied = record.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and v in weights for k, v in tied.items()):
        raise UserError(f"{folder / RECORD_FILE} is damaged ('tied' names weights that {WEIGHTS_FILE} lacks); "
                        "export the model again")
    weights.update({alias: weights[source] for alias, source in tied.items()})
    state = {**NO_TRAINING_STATE, **{k: record.get(k) for k in RECORD_KEYS}, "model": weights}
    problem = record_problem(state, is_sharded=False)
    if problem:
        raise UserError(f"{folder / RECORD_FILE} is damaged or was not written by bigmodel export ({problem}); "
                        "export the model again")
    return checkpoint_from_state(state, folder)


def read_record(path: Path) -> Dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} does not load ({type(err).__name__}); export the model again") from None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path.parent} is not a bigmodel export (no '{EXPORT_FORMAT}' marker in {path.name})")
    return record


def read_weights(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path} does not exist; an exported folder holds {WEIGHTS_FILE} beside {RECORD_FILE}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path} is damaged or truncated ({type(err).__name__}); export the model again") from None

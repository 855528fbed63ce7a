"""A checkpoint: what it holds, how it is written and read (never running code), and how
its weights get into a model.

On disk a checkpoint is a torch.save archive of one dict, marked with FORMAT: the record
(`CheckpointRecord`: step, config, data state, spec, ...) plus "model" and "optimizer"
state dicts; or, for a sharded (FSDP) run, a NAME.dcp folder whose meta.pt holds the
record and whose DCP files hold the tensors (engine/sharded.py). In memory it is a
`Checkpoint`: the record, where it came from, and its tensors or its shards' folder.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from bigmodel_cli.data.base import DataSpec
from bigmodel_cli.engine import distributed, sharded
from bigmodel_cli.engine.checkpoint_file import FORMAT, save_checkpoint  # noqa: F401  (save_checkpoint: the module's API)
from bigmodel_cli.engine.files import check_zip_archive, refusal_reason
from bigmodel_cli.engine.pipeline import cut_of
from bigmodel_cli.errors import UserError


@dataclass
class Provenance:
    """What a run was built from. Its checkpoints store it, so that eval and generate
    rebuild the same model and data (the data module's state holds e.g. its vocabulary)."""

    config: Dict[str, Any]  # the run's whole config, as a plain tree
    choices: Dict[str, str]  # the config group options picked: {"model": "gpt", "data": "text"}
    data: Dict[str, Any]
    spec: DataSpec


@dataclass
class CheckpointRecord:
    """What a checkpoint of `bigmodel train` holds besides its tensors."""

    step: int
    epoch: float
    config: Dict[str, Any]  # the run's whole config, as a plain tree
    choices: Dict[str, str]  # the config group options picked: {"model": "gpt", "data": "text"}
    data: Dict[str, Any]  # the data module's state (vocabulary, tokenizer)
    spec: DataSpec
    best: Dict[str, Any]  # the monitor: {"metric", "value", "step"}
    scheduler: Dict[str, Any]
    scaler: Dict[str, Any]
    rng: List[Any]  # every rank's generator states
    world_size: int
    data_position: Dict[str, int]

    def to_state(self) -> Dict[str, Any]:
        """The record as saved: plain containers only (weights_only loading admits nothing else)."""
        state = {f.name: getattr(self, f.name) for f in fields(CheckpointRecord)}
        state["spec"] = {**asdict(self.spec), "input_shape": list(self.spec.input_shape)}
        return state


@dataclass
class Checkpoint(CheckpointRecord):
    """A checkpoint as read: its record, where it is, and its tensors (or its shards' folder)."""

    path: Path = Path()
    model: Optional[Dict[str, torch.Tensor]] = None  # None for a sharded checkpoint
    optimizer: Optional[Dict[str, Any]] = None
    sharded_dir: Optional[Path] = None  # the DCP folder holding model and optimizer state

    @property
    def is_sharded(self) -> bool:
        return self.sharded_dir is not None

    def to_state(self) -> Dict[str, Any]:
        tensors = {} if self.is_sharded else {"model": self.model, "optimizer": self.optimizer}
        return {**super().to_state(), **tensors}


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / sharded.META).is_file()


def load_checkpoint(path: Path, map_location: Any = "cpu", verify: bool = True) -> Checkpoint:
    """A checkpoint file or sharded folder, read without executing any code
    (weights_only=True; a sharded folder's tensors stay on disk for `load_weights`).
    `verify` checks every byte against the CRC-32 it was written with and, for a sharded
    folder, vets DCP's index. Anything damaged, refused or not a complete bigmodel
    checkpoint is a UserError naming the problem."""
    is_sharded = is_sharded_checkpoint(path)
    state = _read_archive(path / sharded.META if is_sharded else path, map_location, verify)
    problem = record_problem(state, is_sharded)
    if problem:
        raise UserError(f"checkpoint {path} is damaged or was not written by bigmodel train ({problem}); "
                        "use another checkpoint")
    if is_sharded and verify:
        sharded.check_folder(path, state)
    return checkpoint_from_state(state, path, is_sharded)


def checkpoint_from_state(state: Dict[str, Any], path: Path, is_sharded: bool = False) -> Checkpoint:
    """A Checkpoint from a checked state (`record_problem` found nothing in it)."""
    record = {f.name: state[f.name] for f in fields(CheckpointRecord)}
    spec = state["spec"]
    record["spec"] = DataSpec(**{**{k: spec.get(k) for k in SPEC}, "input_shape": tuple(spec["input_shape"])})
    if is_sharded:
        return Checkpoint(**record, path=path, sharded_dir=path)
    return Checkpoint(**record, path=path, model=state["model"], optimizer=state["optimizer"])


# ------------------------------------------------------------------ weights into a model


def load_weights(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Fill `model` (split by FSDP or TP, or not) with a checkpoint's weights: the one way weights
    get into a model for eval, generate, init_from and the final test. Keys or shapes that
    differ are named in one line."""
    if checkpoint.is_sharded:  # DCP reads into any layout, sharded or not
        sharded.load_model(model, checkpoint.sharded_dir)
        return
    weights = checkpoint.model
    if cut_of(model) is not None:  # a pipeline stage takes its own part of the whole model's weights
        own = model.state_dict()
        weights = {key: tensor for key, tensor in weights.items() if key in own}
    check_weights_fit(model, weights, checkpoint.path)
    if distributed.holds_dtensors(model):  # FSDP shards or tensor-parallel layers: each rank takes its part
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, checkpoint.model, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(weights)


def load_model_and_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Weights and optimizer state, to continue training (DCP reshards a sharded checkpoint
    to this run's world size and layout)."""
    if checkpoint.is_sharded:
        from bigmodel_cli.engine.pipeline import cut_of

        cut = cut_of(model)  # a pipeline stage may know a tied weight by another name than the writer
        sharded.load_training_state(model, optimizer, checkpoint.sharded_dir, cut.aliases if cut else None)
    else:
        model.load_state_dict(checkpoint.model)
        optimizer.load_state_dict(checkpoint.optimizer)


def check_weights_fit(model: nn.Module, weights: Mapping[str, torch.Tensor], path: Path) -> None:
    if any(tensor.is_quantized for tensor in weights.values()):
        raise UserError(f"checkpoint {path} holds int8-quantized weights (bigmodel compress method=quantize), "
                        "for CPU inference only; evaluate it with bigmodel eval device=cpu, or train from the "
                        "checkpoint it was made from")
    # (An FSDP2 parameter is a DTensor whose shape is the whole tensor's, not its shard's.)
    state = model.state_dict()
    own = {name: tuple(tensor.shape) for name, tensor in state.items()}
    problems = [f"{k} missing from the checkpoint" for k in own if k not in weights]
    problems += [f"{k} is not in this model" for k in weights if k not in own]
    problems += [f"{k} has shape {tuple(weights[k].shape)} in the checkpoint but {own[k]} here"
                 for k in own if k in weights and tuple(weights[k].shape) != own[k]]
    # load_state_dict would cast integers into float weights (or back) without a word
    problems += [f"{k} holds {weights[k].dtype} in the checkpoint but {state[k].dtype} here" for k in own
                 if k in weights and weights[k].is_floating_point() != state[k].is_floating_point()]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"checkpoint {path} does not fit this model: {'; '.join(problems[:3])}{more}; "
                        "use the model settings of the run that wrote it")


# ------------------------------------------------------------------ reading and checking


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text.split(". ")[0] if text else type(err).__name__)[:200]


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
        with warnings.catch_warnings():  # int8 weights (bigmodel compress) rebuild through deprecated torch APIs
            warnings.filterwarnings("ignore", message=".*(TypedStorage|quantized tensor creation).*")
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

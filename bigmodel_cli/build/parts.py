"""Config -> objects (data, model, optimizer), with one-line errors for impossible choices."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, Optional

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bigmodel_cli.config import SCHEMAS
from bigmodel_cli.data.base import DataModule, DataSpec
from bigmodel_cli.dotted_path import import_object
from bigmodel_cli.engine.logits import logits_of
from bigmodel_cli.errors import UserError, first_line, root_cause
from bigmodel_cli.optim import TorchSchedule, is_torch_scheduler
from bigmodel_cli.optim import build_optimizer as with_param_groups

log = logging.getLogger("bigmodel")

KIND_WORDS = {"vector": "feature vectors", "sequence": "sequences", "image": "images", "tokens": "token sequences"}


def instantiate_or_explain(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with the constructor's own complaint as a UserError."""
    import_target(node, what)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        reason = f"{type(cause).__name__}: {first_line(cause)}" if cause is not None else first_line(err)
        raise UserError(f"could not build the {what} from {what}._target_={node.get('_target_')} "
                        f"({reason})") from None


def import_target(node: DictConfig, what: str) -> Any:
    """The class (or function) that `node._target_` names, or None where it is no dotted path."""
    target = node.get("_target_")
    if not (isinstance(target, str) and "." in target):
        return None
    try:
        return import_object(target)  # a user's class in the working directory is found (see below)
    except Exception as err:  # a missing name, or the user's module failing as it is imported
        raise UserError(f"{what}._target_={target} cannot be imported ({root_cause(err)}); "
                        "give the full dotted path of a class") from None


def build_data(cfg: DictConfig, state: Optional[dict] = None) -> DataModule:
    data = instantiate_or_explain(cfg, "data")
    if state:
        data.load_state_dict(state)
    data.setup()  # says what a user can fix as a UserError; anything else is a bug, reported as one
    return data


def build_optimizer(cfg: DictConfig, model: nn.Module):

    factory = instantiate_or_explain(cfg, "optim")
    try:
        return with_param_groups(factory, model)
    except (ValueError, TypeError, IndexError) as err:
        raise UserError(f"optim={cfg.get('_target_')} rejected its settings ({type(err).__name__}: "
                        f"{first_line(err)}); check the optim.* values") from None


def build_schedule(cfg: DictConfig, total_steps: int):
    """The run's LR schedule (optim.lr_scheduler makes the torch scheduler from it): one of
    bigmodel's schedules, or any torch.optim.lr_scheduler class as a TorchSchedule."""

    cls = import_target(cfg, "scheduler")
    if cls is torch.optim.lr_scheduler.ReduceLROnPlateau:
        raise UserError(f"scheduler._target_={cfg._target_} steps on a validation metric, but bigmodel steps its "
                        "scheduler once per optimizer step; use a step-based one, e.g. scheduler=torch_cosine "
                        "or scheduler=cosine")
    if is_torch_scheduler(cls):
        return TorchSchedule(cls, OmegaConf.to_container(cfg, resolve=True), total_steps)
    return instantiate_or_explain(cfg, "scheduler", total_steps=total_steps)


def builtin_models_for(kind: str, task: Optional[str] = None) -> list[str]:
    names = []
    for name, schema in SCHEMAS["model"].items():
        cls = import_object(schema._target_)
        if kind in getattr(cls, "input_kinds", ()) and (task is None or task in getattr(cls, "tasks", (task,))):
            names.append(name)
    return names


def accepted_kwargs(target: Any, offered: Dict[str, Any]) -> Dict[str, Any]:
    """The subset of `offered` that `target`'s constructor names (all, if it takes **kwargs)."""
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in params}


# Keys of the model group that say how to run the model rather than what it is:
# engine/parallelize.py applies them, the model's constructor never sees them.
HOW_TO_RUN_KEYS = ("activation_checkpointing",)


def model_description(cfg: DictConfig, target: Any) -> DictConfig:
    """The model config without the how-to-run keys its constructor does not take itself."""
    dropped = [key for key in HOW_TO_RUN_KEYS if key in cfg and not takes_key(target, key)]
    if not dropped:
        return cfg
    return OmegaConf.masked_copy(cfg, [key for key in cfg if key not in dropped])


def takes_key(target: Any, key: str) -> bool:
    """Whether a model class (or its instance) handles `key` itself, in its constructor."""
    constructor = type(target) if isinstance(target, nn.Module) else target
    return key in accepted_kwargs(constructor, {key: None})


def engine_recomputes(model_cfg: DictConfig) -> bool:
    """Whether the engine checkpoints the model's blocks' activations: asked for, and the model
    does not take model.activation_checkpointing itself. Asked of the class the config names,
    since a builder function may return a class that takes **kwargs."""
    key = "activation_checkpointing"
    return bool(model_cfg.get(key, False)) and not takes_key(import_object(model_cfg._target_), key)


def build_model(cfg: DictConfig, spec: DataSpec, model_name: str = "", data_name: str = "") -> nn.Module:
    target_path = cfg.get("_target_")
    try:
        target = import_object(target_path)
    except Exception as err:  # a missing name, or the user's module failing as it is imported
        raise UserError(f"model._target_={target_path} cannot be imported ({root_cause(err)}); "
                        "give the full dotted path of an nn.Module class") from None
    kinds = getattr(target, "input_kinds", None)
    if kinds is not None and spec.input_kind not in kinds:
        model_name = model_name or getattr(target, "__name__", str(target_path))
        data_name = data_name or "this data set"
        fits = ", ".join(builtin_models_for(spec.input_kind, spec.task)) or "none of the built-in models"
        raise UserError(
            f"model={model_name} cannot train on data={data_name}: it reads "
            f"{' or '.join(KIND_WORDS[k] for k in kinds)}, but {data_name} gives "
            f"{KIND_WORDS[spec.input_kind]} {spec.input_shape}; models for this data: {fits}")
    tasks = getattr(target, "tasks", None)
    if tasks is not None and spec.task not in tasks:
        model_name = model_name or getattr(target, "__name__", str(target_path))
        raise UserError(f"model={model_name} cannot train on data={data_name or 'this data set'}: it is for "
                        f"{' or '.join(tasks)}, but the data is for {spec.task}; models for this data: "
                        f"{', '.join(builtin_models_for(spec.input_kind, spec.task)) or 'none of the built-in models'}")
    description = with_nested_sizes(model_description(cfg, target), spec)
    model = instantiate_or_explain(description, "model", **accepted_kwargs(target, spec.model_kwargs()))
    if not isinstance(model, nn.Module):
        raise UserError(f"model._target_={target_path} built a {type(model).__name__}, not a torch.nn.Module")
    return model


# The names under which an object the model config nests (model.config: a Hugging Face
# config, say) takes the sizes the data implies; it gets the first of each that its class
# declares, as a constructor argument or a class attribute.
NESTED_SIZE_NAMES = {
    "vocab_size": ("vocab_size",),
    "block_size": ("block_size", "n_positions", "max_position_embeddings"),
    "num_outputs": ("num_outputs", "num_labels", "num_classes"),
}


def with_nested_sizes(cfg: DictConfig, spec: DataSpec) -> DictConfig:
    """The model config with the data's sizes set in each nested node that builds an object
    (one with a `_target_`), as the model's own constructor gets them."""
    sizes = {"vocab_size": spec.vocab_size, "block_size": spec.block_size,
             # a language model's outputs are its vocabulary, not labels
             "num_outputs": None if spec.task == "language_modeling" else spec.num_outputs}
    given: Dict[str, Dict[str, Any]] = {}
    for key, node in cfg.items():
        if isinstance(node, DictConfig) and isinstance(node.get("_target_"), str):
            try:
                cls = import_object(node._target_)
            except Exception:  # instantiate says why, in one line
                continue
            given[key] = {}
            for size, names in NESTED_SIZE_NAMES.items():
                name = first_declared(cls, names)
                if sizes[size] is not None and name is not None:
                    given[key][name] = sizes[size]
    if not any(given.values()):
        return cfg
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, values in given.items():
        for name, value in values.items():
            out[key][name] = value
    return out


def first_declared(cls: Any, names: tuple) -> Optional[str]:
    """The first of `names` that `cls` declares (never one it would take through **kwargs)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    for name in names:
        param = params.get(name)
        if (param is not None and param.kind is not inspect.Parameter.VAR_KEYWORD) or hasattr(cls, name):
            return name
    return None


def check_model_fits(model: nn.Module, data: DataModule, task_name: str) -> None:
    """One forward pass on two training samples, so that a model that cannot read this data
    fails now with one line rather than mid-run with a traceback."""


    x, y = next(iter(data.eval_batches("train", batch_size=2)))
    name = type(model).__name__
    given = f"a batch {tuple(x.shape)} of {str(x.dtype).replace('torch.', '')}"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = logits_of(model(x))
    except Exception as err:  # the model's own code: whatever it raises means it cannot read this data
        raise UserError(f"{name} cannot read this data: given {given} it failed with "
                        f"{type(err).__name__}: {first_line(err)}") from None
    finally:
        model.train(was_training)
    n_out = data.spec.num_outputs
    expected = {"classification": (x.shape[0], n_out), "regression": tuple(y.shape),
                "language_modeling": (*y.shape, n_out)}[task_name]
    if tuple(out.shape) != expected:
        fix = (f"its last dimension is the vocabulary: give it vocab_size={n_out}" if task_name == "language_modeling"
               else f"give it num_outputs={n_out} outputs")
        raise UserError(f"{name} returns {tuple(out.shape)} for {given}, but this {task_name} "
                        f"data needs {expected}; {fix}")


def count_parameters(model: nn.Module) -> int:
    # Tied weights (GPT's embedding and LM head) are one tensor: count it once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))

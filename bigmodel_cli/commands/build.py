"""Config -> objects: data module and model, with one-line errors for impossible choices."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, Optional

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig
from torch import nn

from bigmodel_cli.config import SCHEMAS
from bigmodel_cli.data.base import DataModule, DataSpec
from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")

KIND_WORDS = {"vector": "feature vectors", "sequence": "sequences", "image": "images", "tokens": "token sequences"}


def _instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with the constructor's own complaint as a UserError."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(err).splitlines()[0]
        raise UserError(f"could not build the {what} from {what}._target_={node.get('_target_')} "
                        f"({reason.strip().splitlines()[0]})") from None


def build_data(cfg: DictConfig, state: Optional[dict] = None) -> DataModule:
    data = _instantiate(cfg, "data")
    if state:
        data.load_state_dict(state)
    data.setup()
    return data


def builtin_models_for(kind: str) -> list[str]:
    names = []
    for name, schema in SCHEMAS["model"].items():
        cls = get_object(schema._target_)
        if kind in getattr(cls, "input_kinds", ()):
            names.append(name)
    return names


def accepted_kwargs(target: Any, offered: Dict[str, Any]) -> Dict[str, Any]:
    """The subset of `offered` that `target`'s constructor names (all, if it takes **kwargs)."""
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in params}


def build_model(cfg: DictConfig, spec: DataSpec, model_name: str = "", data_name: str = "") -> nn.Module:
    target_path = cfg.get("_target_")
    try:
        target = get_object(target_path)
    except Exception as err:
        raise UserError(f"model._target_={target_path} cannot be imported ({err}); "
                        "give the full dotted path of an nn.Module class") from None
    kinds = getattr(target, "input_kinds", None)
    if kinds is not None and spec.input_kind not in kinds:
        model_name = model_name or getattr(target, "__name__", str(target_path))
        data_name = data_name or "this data set"
        fits = ", ".join(builtin_models_for(spec.input_kind)) or "none of the built-in models"
        raise UserError(
            f"model={model_name} cannot train on data={data_name}: it reads "
            f"{' or '.join(KIND_WORDS[k] for k in kinds)}, but {data_name} gives "
            f"{KIND_WORDS[spec.input_kind]} {spec.input_shape}; models for this data: {fits}")
    model = _instantiate(cfg, "model", **accepted_kwargs(target, spec.model_kwargs()))
    if not isinstance(model, nn.Module):
        raise UserError(f"model._target_={target_path} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    # Tied weights (GPT's embedding and LM head) are one tensor: count it once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))

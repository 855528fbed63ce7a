"""Which keys a config node may hold, and a one-line message for one it may not.

Hydra's `+group.key=value` adds a key even to a schema-backed node, so a typo such as
`+trainer.max_step=50` would otherwise be accepted silently. The nodes checked here are
those whose schema is bigmodel's own: the trainer, the loggers, and the model, data and
scheduler options whose `_target_` is one of bigmodel's classes (not torch's LR schedulers,
which take their own arguments). A user's own `_target_`
(model=custom) takes any keys, and so does optim (torch's optimizers take keyword
arguments beyond the schema, e.g. +optim.fused=false, and reject unknown ones themselves).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from types import ModuleType
from typing import Dict, List, Mapping, Optional, Tuple

from bigmodel_cli.command_table import COMMANDS
from bigmodel_cli.config import SCHEMAS, DistillConfig, LrFindConfig, TokenizerConfig, TrainerConfig

#: top-level keys of the commands that take train's config groups (train, plan; lr-find adds lr_find)
TRAIN_KEYS = ("model", "optim", "scheduler", "data", "trainer", "logger", "distill")


def command_module(command: str) -> ModuleType:
    """The module of a command in the table (torch-free at import): its schema is registered."""
    return importlib.import_module(COMMANDS[command].module)


def command_schema(command: str) -> Optional[type]:
    """The command's own top-level schema (eval's EvalConfig), or None for train's groups."""
    return getattr(command_module(command), "SCHEMA", None)


def command_keys(command: str) -> Optional[Tuple[str, ...]]:
    """The top-level keys of a command's config (besides `hydra`); None for a command without a config."""
    if command not in COMMANDS or not COMMANDS[command].hydra:
        return None
    schema = command_schema(command)
    if schema is not None:
        return tuple(f.name for f in dataclasses.fields(schema))
    return tuple(getattr(command_module(command), "KEYS", TRAIN_KEYS))


def takes_loggers(command: str) -> bool:
    """Whether the command takes train's whole config, loggers included."""
    return "logger" in (command_keys(command) or ())


#: groups whose node may take keys of its own beyond the schema
OPEN_GROUPS = ("optim",)


def field_names(schema: type) -> List[str]:
    return [f.name for f in dataclasses.fields(schema)]


def field_type(schema: Optional[type], key: str) -> Optional[type]:
    """The type of a schema's field, resolved in the schema's own module (the annotations are
    strings), Optional[X] as X; None where there is no such field."""
    if schema is None or key not in field_names(schema):
        return None
    kind = typing.get_type_hints(schema).get(key)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) is typing.Union and len(args) == 1 else kind


def schema_by_target() -> Dict[str, type]:
    """bigmodel's own `_target_`s -> their schema dataclass."""
    out: Dict[str, type] = {}
    for options in SCHEMAS.values():
        for schema in options.values():
            target = getattr(schema, "_target_", None)
            if isinstance(target, str) and target:
                out[target] = schema
    return out


def schema_of(group: str, node: Mapping) -> Optional[type]:
    """The schema dataclass a node of `group` was made from, where it is bigmodel's own."""
    if group == "trainer":
        return TrainerConfig
    if group == "tokenizer":
        return TokenizerConfig
    if group == "lr_find":
        return LrFindConfig
    if group == "distill":
        return DistillConfig
    if not isinstance(node, Mapping):
        return None
    return schema_by_target().get(str(node.get("_target_", "")))


#: a scheduler node naming one of torch's LR schedulers takes that class's own arguments
#: (+scheduler.T_max=...); the class rejects unknown ones itself (optim.TorchSchedule)
TORCH_SCHEDULERS = "torch.optim.lr_scheduler."


def node_schema(group: str, node: Mapping) -> Optional[type]:
    """The schema a node of `group` must follow, or None where it may take any keys."""
    if group == "scheduler" and isinstance(node, Mapping) and str(node.get("_target_", "")).startswith(TORCH_SCHEDULERS):
        return None
    return None if group in OPEN_GROUPS else schema_of(group, node)


def unknown_key(command: str, cfg: Mapping) -> Optional[Tuple[str, List[str]]]:
    """The first key that no schema allows, as (dotted key, the keys allowed there)."""
    allowed_top = command_keys(command)
    if allowed_top is None:
        return None
    for key in cfg:
        if key != "hydra" and key not in allowed_top:
            return str(key), list(allowed_top)
    nodes = [(g, cfg.get(g)) for g in ("model", "data", "scheduler", "trainer", "lr_find", "distill")]
    if takes_loggers(command):
        nodes += [(f"logger.{name}", node) for name, node in (cfg.get("logger") or {}).items()]
    for where, node in nodes:
        schema = node_schema(where.split(".")[0], node) if node is not None else None
        found = extra_key(where, node, schema) if schema is not None else None
        if found:
            return found
    return None


def extra_key(where: str, node: Mapping, schema: type) -> Optional[Tuple[str, List[str]]]:
    """The first key of `node` outside `schema`, looking into nested schema nodes too
    (trainer.early_stopping)."""
    allowed = field_names(schema)
    extra = [k for k in node if k not in allowed]
    if extra:
        return f"{where}.{extra[0]}", [k for k in allowed if not k.startswith("_")]
    for field in dataclasses.fields(schema):
        inner = field_type(schema, field.name)
        if dataclasses.is_dataclass(inner) and isinstance(node.get(field.name), Mapping):
            found = extra_key(f"{where}.{field.name}", node[field.name], inner)
            if found:
                return found
    return None


def unknown_key_message(key: str, allowed: List[str], command: str = "train") -> str:
    """`unknown key trainer.max_step; did you mean trainer.max_steps? keys of trainer: ...`"""
    parent, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, allowed, n=1, cutoff=0.6)
    prefix = f"{parent}." if parent else ""
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    group = key.split(".")[0]
    owners = [f"{group}={name}" for name, schema in SCHEMAS.get(group, {}).items()
              if parent == group and leaf in field_names(schema)]
    if owners:  # the likelier mistake: the key is right, the option is not
        hint = f"it is a key of {' or '.join(owners)}; "
    where = f"keys of {parent}" if parent else "top-level keys"
    if not allowed:
        if not parent:
            return f"unknown key {key}: the config takes no keys"
        # An open node with nothing in it yet (model.config, eval's data): a '+' adds a key.
        return f"unknown key {key}: {parent} holds no keys yet; add one with a '+': +{key}=..."
    return (f"unknown key {key}; {hint}{where}: {', '.join(allowed)} "
            f"(bigmodel {command} --help describes them)")

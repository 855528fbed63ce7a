"""`bigmodel <command> --help`: its config groups and options, then every key with its
value and its one-line description. Torch-free, so it answers at once."""

from __future__ import annotations

import dataclasses
import sys
from typing import List, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from bigmodel_cli import preflight
from bigmodel_cli.config_docs import describe
from bigmodel_cli.config import Choice
from bigmodel_cli.config_keys import command_keys, command_schema, field_type, schema_of


def print_help(command: str, args: Sequence[str]) -> int:
    overrides = [a for a in args if a not in ("--help", "-h") and not a.startswith("-")]
    try:
        cfg = preflight.compose(command, overrides)
    except preflight.OverrideError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(help_text(command, cfg))
    return 0


def help_text(command: str, cfg: DictConfig) -> str:
    hydra_help = cfg.hydra.help
    lines = [str(hydra_help.header).rstrip(), ""]
    groups = preflight.top_level_groups(command, cfg)
    if groups:
        lines += ["== Config groups (group=option; the chosen one in [brackets]) ==", *group_lines(cfg, groups), ""]
    lines.append("== Keys (group.key=value; +group.key=value adds one a custom model takes) ==")
    body = OmegaConf.to_container(cfg, resolve=False)
    body.pop("hydra", None)
    for key in command_keys(command) or tuple(body):
        if key in body:
            lines += key_lines(command, key, body[key])
    footer = str(hydra_help.footer or "").rstrip()
    return "\n".join(lines + (["", footer] if footer else []))


def group_lines(cfg: DictConfig, groups: List[str]) -> List[str]:
    choices = cfg.hydra.runtime.choices
    width = max(len(g) for g in groups)
    out = []
    for group in groups:
        chosen = choices.get(group)
        chosen = [str(c) for c in chosen] if OmegaConf.is_list(chosen) else [str(chosen)]
        if group == "logger":  # a list of options: Hydra records no single choice
            chosen = [str(name) for name in (cfg.get("logger") or {})]
        shown = [f"[{o}]" if o in chosen else o for o in preflight.group_options(group)]
        out.append(f"  {group:<{width}}  {' '.join(shown)}")
    return out


#: keys that only tell Hydra how to build a node
HIDDEN = ("_partial_", "_convert_")


def key_lines(command: str, key: str, value, prefix: str = "") -> List[str]:
    """`  trainer.max_steps=2000   Training stops at whichever limit comes first; ...`"""
    dotted = f"{prefix}{key}"
    if not isinstance(value, Mapping):
        return [entry(dotted, value, describe_key(command_schema(command), key))]
    if key == "logger" and not prefix:
        return [line for name, node in value.items() for line in key_lines(command, name, node, "logger.")]
    schema = schema_of(dotted.split(".")[0], value) if (command, key) != ("eval", "data") else None
    schema = schema or nested_schema(command_schema(command), key)  # a command's own nested node (prune)
    return node_lines(dotted, value, schema)


def node_lines(dotted: str, node: Mapping, schema: Optional[type]) -> List[str]:
    """A node's keys; a nested schema node (trainer.early_stopping) key by key too."""
    out = []
    for sub, sub_value in node.items():
        inner = nested_schema(schema, sub)
        if isinstance(sub_value, Mapping) and inner is not None:
            out += node_lines(f"{dotted}.{sub}", sub_value, inner)
        elif sub not in HIDDEN:
            out.append(entry(f"{dotted}.{sub}", sub_value, describe_key(schema, sub)))
    return out


def nested_schema(schema: Optional[type], key: str) -> Optional[type]:
    inner = field_type(schema, key)
    return inner if dataclasses.is_dataclass(inner) else None


def describe_key(schema: Optional[type], key: str) -> str:
    """The schema comment's first sentence, and the allowed values of an enum key."""
    if key == "_target_":
        return "the class this node builds (an import path)"
    if schema is None:
        return ""
    text = describe(schema, key)
    if len(text) > 100 and ". " in text:
        text = text.split(". ")[0] + "."
    allowed = choices_of(schema, key)
    if allowed and allowed not in text:
        text = f"{text} ({allowed})" if text else allowed
    return text


def choices_of(schema: type, key: str) -> str:
    """`fp32 | bf16 | fp16` for a key typed with one of the Choice enums."""
    enum = field_type(schema, key)
    if isinstance(enum, type) and issubclass(enum, Choice):
        return " | ".join(member.value for member in enum)
    return ""


def entry(dotted: str, value, doc: str) -> str:
    shown = f"  {dotted}={'null' if value is None else value}"
    if not doc:
        return shown
    if len(shown) > 40:
        return f"{shown}\n{'':<42}{doc}"
    return f"{shown:<42}{doc}"

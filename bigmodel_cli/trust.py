"""What a checkpoint's stored config may make bigmodel import and call.

`bigmodel eval` and `generate` rebuild the model (and data) from the config a checkpoint
stores. Every `_target_` in it is an import path that `hydra.utils.instantiate` would
import and call, so a checkpoint from someone else could name any callable on the machine.
A stored `_target_` is therefore followed only when it is one of bigmodel's own classes
(the defaults of the schemas in config.py) or one the user names on this command line
(`trusted_targets=[mypkg.nets.MyNet]`); anything else is refused before any import.
Stored strings are data: `${...}` is refused in the sections that get instantiated (Hydra's
`instantiate` resolves a node before it builds it, so `${oc.create:{_target_: ...}}` would
make a target no check has seen; a config `bigmodel train` stores is resolved and holds
none) and kept as plain text everywhere else.

No torch here: the check runs before anything heavy is imported.
"""

from __future__ import annotations

import re
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterator, Mapping, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from bigmodel_cli.errors import UserError


@lru_cache(maxsize=None)
def own_targets() -> FrozenSet[str]:
    """Every `_target_` that bigmodel's own schemas default to."""
    from bigmodel_cli.config import SCHEMAS

    targets = set()
    for options in SCHEMAS.values():
        for schema in options.values():
            for f in fields(schema):
                if f.name == "_target_" and isinstance(f.default, str) and f.default is not NO_DEFAULT:
                    targets.add(f.default)
    return frozenset(t for t in targets if t != "???")


@lru_cache(maxsize=None)
def import_path_keys() -> Dict[str, FrozenSet[str]]:
    """bigmodel's own `_target_`s -> their keys that name code to import (data.source), marked
    `metadata={"import_path": True}` in the schema: followed only when trusted, like a target."""
    from bigmodel_cli.config import SCHEMAS

    keys: Dict[str, FrozenSet[str]] = {}
    for options in SCHEMAS.values():
        for schema in options.values():
            marked = frozenset(f.name for f in fields(schema) if f.metadata.get("import_path"))
            if marked:
                keys[getattr(schema, "_target_")] = marked
    return keys


def targets_in(node: Any, where: str) -> Iterator[Tuple[str, str]]:
    """(dotted key, target) of every `_target_` anywhere under `node` (instantiate recurses),
    and of every key of one of our classes that names code (data.source)."""
    if isinstance(node, Mapping):
        code_keys = import_path_keys().get(node.get("_target_"), ()) if isinstance(node.get("_target_"), str) else ()
        for key, value in node.items():
            name = f"{where}.{key}"
            if key == "_target_" or (key in code_keys and value is not None):
                yield name, value
            else:
                yield from targets_in(value, name)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from targets_in(value, f"{where}[{i}]")


def strings_in(node: Any, where: str) -> Iterator[Tuple[str, str]]:
    """(dotted key, text) of every string under `node`, keys included."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            name = f"{where}.{key}"
            if isinstance(key, str):
                yield name, key
            yield from strings_in(value, name)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from strings_in(value, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


def vetted_config(stored: Mapping[str, Any], source: Path, trusted: Sequence[str] = (),
                  sections: Sequence[str] = ("model", "data")) -> DictConfig:
    """The stored config as a DictConfig whose `sections` name only targets that may be
    followed; a UserError naming the first other one (nothing has been imported yet)."""
    allowed = own_targets() | {str(t) for t in trusted}
    for section in sections:
        for key, text in strings_in(stored.get(section), section):
            if "${" in text:
                raise UserError(f"refused to rebuild from checkpoint {source}: {key} holds an interpolation "
                                f"({text[:60]!r}), which rebuilding would resolve and which could run code; "
                                "a config that bigmodel train stored holds none, so this one was edited")
        for key, target in targets_in(stored.get(section), section):
            if not isinstance(target, str) or target not in allowed:
                shown = str(target)[:120]
                raise UserError(
                    f"refused to follow {key}={shown} from checkpoint {source}: it is not one of bigmodel's own "
                    f"classes, and importing it could run code; if you trust whoever made this checkpoint, "
                    f"add trusted_targets=[{shown}]")
    try:
        return OmegaConf.create(_literal(dict(stored)))
    except Exception as err:  # values OmegaConf cannot hold (tensors, odd keys): not a config we wrote
        raise UserError(f"checkpoint {source} is damaged (its stored config does not load: "
                        f"{type(err).__name__}); use another checkpoint") from None


def _literal(value: Any) -> Any:
    """A copy in which `${...}` is plain text (OmegaConf's escape), never an interpolation."""
    if isinstance(value, Mapping):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_literal(v) for v in value]
    if isinstance(value, str):
        # Backslashes right before "${" escape each other: k of them become 2k, then "\${".
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    return value

"""A dotted path ('pkg.module.Name', as a config's `_target_` names a class) -> the object."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def import_object(path: str) -> Any:
    """'pkg.module.Name' -> the object. A user's `_target_` is found as `python -m` would find
    it: on sys.path, and else in the working directory (added to the end of sys.path only
    then, so it never shadows an installed module)."""
    here = os.getcwd()
    try:
        return _import_longest_prefix(path)
    except NoSuchModule as err:
        if here in sys.path or "" in sys.path:
            raise NoSuchModule(f"{err}, neither on sys.path nor in the working directory {here}") from None
    sys.path.append(here)
    importlib.invalidate_caches()
    try:
        return _import_longest_prefix(path)
    except NoSuchModule as err:
        raise NoSuchModule(f"{err}, neither on sys.path nor in the working directory {here}") from None


class NoSuchModule(ImportError):
    """No prefix of a dotted path names an importable module."""


def _import_longest_prefix(path: str) -> Any:
    """'pkg.module.Name' -> the object, importing the longest importable module prefix."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as err:
            if err.name and not ".".join(parts[:cut]).startswith(err.name):
                raise  # the module exists but one of its own imports is missing
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise NoSuchModule(f"no module named '{parts[0]}'")


def import_or_none(path: str) -> Any:
    """The object a dotted path names, or None where it names none or cannot be imported:
    for checks that run before the build, which then says why."""
    try:
        return import_object(path) if "." in path else None
    except Exception:  # noqa: BLE001 - the user's module may raise anything as it is imported
        return None

"""Each schema key's one-line description, read from the comments in the schema's own
module (config.py for the groups, a command's module for its top-level schema).

The comment on a field's line, or the comment lines right above it, describe the field;
a subclass inherits its bases' descriptions. Read from the source text (no import of
torch or of the models), so that `bigmodel <command> --help` answers at once.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from functools import lru_cache
from pathlib import Path
from typing import Dict, Tuple

SOURCE = Path(__file__).with_name("config.py")


def _comments_by_line(source: str) -> Tuple[Dict[int, str], Dict[int, str]]:
    """(comments that end a line of code, comments on lines of their own), by line."""
    trailing, own = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            alone = not tok.line[: tok.start[1]].strip()
            (own if alone else trailing)[tok.start[0]] = text
    return trailing, own


def _field_doc(line: int, trailing: Dict[int, str], own: Dict[int, str]) -> str:
    """The comment ending the field's line, else the comment block right above it."""
    if line in trailing:
        return trailing[line]
    above, n = [], line - 1
    while n in own:
        above.insert(0, own[n])
        n -= 1
    return " ".join(above)


@lru_cache(maxsize=None)
def descriptions(path: Path = SOURCE) -> Dict[str, Dict[str, str]]:
    """class name -> {field name: description} for every dataclass in the module at `path`."""
    source = path.read_text(encoding="utf-8")
    trailing, own = _comments_by_line(source)
    classes: Dict[str, Dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs: Dict[str, str] = {}
        for base in node.bases:  # bases come first in the file
            if isinstance(base, ast.Name):
                docs.update(classes.get(base.id, {}))
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                text = _field_doc(item.lineno, trailing, own)
                if text or item.target.id not in docs:
                    docs[item.target.id] = text
        classes[node.name] = docs
    return classes


def describe(schema: type, key: str) -> str:
    module = sys.modules.get(schema.__module__)
    path = Path(getattr(module, "__file__", None) or SOURCE)
    return descriptions(path).get(schema.__name__, {}).get(key, "")

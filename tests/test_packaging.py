"""The wheel ships every package of bigmodel_cli (pyproject lists them by hand, beside conf/)."""

import pytest
import tomllib
from pathlib import Path

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "bigmodel_cli").rglob("__init__.py")}
    missing = sorted(found - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml, or `pip install .` leaves them out"

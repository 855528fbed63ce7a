"""Every config option composes and validates; typos and bad values are caught early."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from bigmodel_cli.config_checks import validate_train_config
from bigmodel_cli.errors import UserError

pytestmark = pytest.mark.unit

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ["model", "optim", "scheduler", "data", "trainer"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g) if o != "custom"])
def test_every_option_composes_and_validates(compose, group, option):
    cfg = compose(f"{group}={option}")
    validate_train_config(cfg)
    assert cfg[group]._target_ if group != "trainer" else cfg.trainer.max_steps


def test_train_help_lists_every_option():
    from bigmodel_cli import preflight
    from bigmodel_cli.help import help_text

    text = help_text("train", preflight.compose("train", []))
    groups = text[text.index("== Config groups"):text.index("== Keys")]
    for group in GROUPS + ["experiment"]:
        line = next(line for line in groups.splitlines() if line.split()[:1] == [group])
        for option in options(group):
            assert option in line.split() or f"[{option}]" in line.split(), f"{group}={option} missing from --help"


@pytest.mark.parametrize("override,error", [
    ("trainer.max_stepz=5", ConfigCompositionException),
    ("model.hiden_sizes=[3]", ConfigCompositionException),
    ("trainer.max_steps=abc", ConfigCompositionException),
    ("trainer.precision=fp8", ConfigCompositionException),
    ("model=nonexistent", ConfigCompositionException),
])
def test_schema_rejects_typos_and_wrong_types(compose, override, error):
    with pytest.raises((error, ConfigKeyError, ValidationError)):
        compose(override)


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=0"], "optim.lr must be > 0"),
    (["optim.lr=-1e-3"], "optim.lr must be > 0"),
    (["data.batch_size=0"], "data.batch_size must be > 0"),
    (["trainer.max_steps=null"], "both null"),
    (["trainer.grad_accum_steps=0"], "grad_accum_steps"),
    (["data.val_fraction=1.5"], "between 0 and 1"),
    (["model=custom"], "model._target_ has no value"),
])
def test_values_checked_before_anything_runs(compose, overrides, message):
    with pytest.raises(UserError, match=message):
        validate_train_config(compose(*overrides))


def test_user_model_via_target(compose):
    cfg = compose("model=custom", "model._target_=torch.nn.Identity", "+model.unused=1")
    validate_train_config(cfg)
    assert cfg.model.unused == 1

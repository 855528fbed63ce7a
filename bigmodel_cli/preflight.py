"""A command's overrides checked before anything heavy is imported or any folder made.

The config is composed with Hydra's own compose API, exactly as the command will compose
it, so nothing is refused here that Hydra would accept. What goes wrong becomes one line
with a suggestion (`unknown model 'resnet'; did you mean model=rnn? options: ...`) instead
of Hydra's multi-line message; an error not recognised here is left to Hydra to report.
Torch-free: `bigmodel train --help` is answered from the same composition.
"""

from __future__ import annotations

import difflib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

#: `key=~/x` or `key=~` (the shell does not expand `~` after `=`, and Hydra's grammar rejects it)
HOME_VALUE = re.compile(r"^([^=~'\"-][^=]*=)(~(?:/[^,]*)?(?:,~(?:/[^,]*)?|,[^,~]*)*)$")


#: compositions checked for one sweep (about 50 ms each); the rest Hydra checks per job
MAX_VARIANTS = 16


class OverrideError(Exception):
    """An override that cannot compose; the message is the one line to show."""


def expand_home(args: Sequence[str]) -> List[str]:
    """`data.path=~/corpus.txt` -> `data.path=/home/me/corpus.txt`, as a shell does for
    `--path=~/x` (each value of a sweep, `~/a,~/b`, too); quoted values
    (`'data.path="~/x"'`) and `~name` are left alone."""
    out = []
    for arg in args:
        match = HOME_VALUE.match(arg)
        if match:
            values = [os.path.expanduser(v) if v == "~" or v.startswith("~/") else v
                      for v in match.group(2).split(",")]
            arg = match.group(1) + ",".join(values)
        out.append(arg)
    return out


def parse_command_line(args: Sequence[str]):
    """Hydra's own argument parser: the flags, and the overrides. A flag it does not know
    raises ValueError quietly here; Hydra itself then reports it."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def refuse(message: str):
        raise ValueError(message)

    parser.error = refuse
    return parser.parse_args(list(args))


@contextmanager
def config_tree() -> Iterator[None]:
    from hydra import initialize_config_dir

    from bigmodel_cli.commands import CONFIG_DIR
    from bigmodel_cli.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield


def compose(command: str, overrides: Sequence[str]) -> DictConfig:
    """The command's config with these overrides, or an OverrideError with one line."""
    from hydra import compose as hydra_compose

    from bigmodel_cli.command_table import config_name
    from bigmodel_cli.config_keys import command_module

    command_module(command)  # importing it registers the command's own schema
    try:
        with config_tree():
            return hydra_compose(config_name=config_name(command), overrides=list(overrides),
                                 return_hydra_config=True)
    except Exception as err:  # Hydra's and OmegaConf's errors, translated below
        message = explain(err, command, overrides)
        if message is None:
            raise
        raise OverrideError(message) from err


def check(command: str, args: Sequence[str]) -> Optional[str]:
    """None when the overrides compose (in a sweep: each value of each swept key), else
    the one line to print. Flags that change where the config comes from skip the check."""
    try:
        parsed = parse_command_line(args)
    except (ValueError, SystemExit):  # Hydra's own parser reports it, in its words
        return None
    if parsed.config_path or parsed.config_name or parsed.config_dir or parsed.experimental_rerun:
        return None
    try:
        for overrides in variants(parsed.overrides, parsed.multirun):
            cfg = compose(command, overrides)
            refuse_unknown_keys(command, cfg)
    except OverrideError as err:
        return str(err)
    except Exception:  # not ours to judge: Hydra reports it in its own words
        return None
    return None


def refuse_unknown_keys(command: str, cfg: DictConfig) -> None:
    from bigmodel_cli.config_keys import unknown_key, unknown_key_message

    found = unknown_key(command, OmegaConf.to_container(cfg, resolve=False))
    if found:
        raise OverrideError(unknown_key_message(*found, command=command))


def variants(overrides: Sequence[str], multirun: bool) -> Iterator[List[str]]:
    """The override lists to compose: as given; under -m, each value of each swept key
    with the other keys at their first value (sweeps a sweeper draws from, such as
    interval(), are left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(list(overrides))
    except Exception as err:
        raise OverrideError(parse_error_line(err, overrides)) from err
    if not multirun or not any(o.is_sweep_override() for o in parsed):
        yield list(overrides)
        return
    base, alternatives = [], []
    for o in parsed:
        if not o.is_sweep_override():
            base.append(o.input_line)
            continue
        try:
            values = [f"{o.get_key_element()}={v}" for v in sweep_values(o)]
        except OverrideError:
            raise
        except Exception:  # glob(): not listed here
            if "." not in o.key_or_group:
                return  # a group's options unknown: the other keys cannot be judged; Hydra will
            continue
        if values:
            alternatives.append((len(base), values[1:]))
            base.append(values[0])
    yield base
    checked = 1
    for index, others in alternatives:
        for value in others:
            if checked >= MAX_VARIANTS:
                return
            checked += 1
            yield base[:index] + [value] + base[index + 1:]


def sweep_values(override) -> List[Any]:
    """The values of a swept override; for interval() (drawn by a sweeper such as Optuna)
    its two ends, so that its key and type are checked before the sweep starts."""
    from hydra.core.override_parser.types import IntervalSweep

    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        key = override.get_key_element()
        if sweep.start == sweep.end:
            raise OverrideError(f"{key}: interval({sweep.start:g},{sweep.end:g}) holds one value; set "
                                f"{key}={sweep.start:g}, or give a wider interval")
        if not sweep.start < sweep.end:
            raise OverrideError(f"{key}: interval({sweep.start:g},{sweep.end:g}) is empty; write the low end "
                                f"first, e.g. {key}=interval({min(sweep.start, sweep.end):g},"
                                f"{max(sweep.start, sweep.end):g})")
        if "log" in sweep.tags and sweep.start <= 0:
            raise OverrideError(f"{key}: a log-scale interval needs a low end above 0 (got {sweep.start:g}); "
                                f"e.g. {key}='tag(log,interval(1e-5,{sweep.end:g}))'")
        return [sweep.start, sweep.end]
    return list(override.sweep_string_iterator())


#: Hydra's sweep functions, and how each is written
SWEEP_FUNCTIONS = {"interval": "interval(1e-4,1e-1) (log scale: tag(log,interval(1e-4,1e-1)))",
                   "tag": "tag(log,interval(1e-4,1e-1))", "choice": "choice(16,32,64)",
                   "range": "range(1,10) or range(0,1,0.25)", "glob": "glob(*)",
                   "sort": "sort(3,1,2)", "shuffle": "shuffle(1,2,3)"}


def parse_error_line(err: Exception, overrides: Sequence[str]) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    bad = str(overrides[0]) if overrides else ""
    for override in overrides:
        try:
            parser.parse_override(override)
        except Exception:  # the first one Hydra cannot read
            bad = override
            break
    key, _, value = bad.partition("=")
    function = value.partition("(")[0].strip()
    if function in SWEEP_FUNCTIONS:
        return (f"cannot read the search space {bad!r}; write it as {key}={SWEEP_FUNCTIONS[function]}, "
                f"in single quotes for the shell")
    return (f"cannot read the override {bad!r}: Hydra's syntax does not allow some characters "
            f"(~ * ( ) , spaces ...) unquoted; quote the value for Hydra inside quotes for the "
            f"shell: '{key}=\"{value}\"'")


# ------------------------------------------------------------------ translation


def explain(err: Exception, command: str, overrides: Sequence[str]) -> Optional[str]:
    """Hydra's multi-line error as one line with a suggestion; None if not recognised."""
    from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    from bigmodel_cli.errors import first_line

    cause = err.__cause__
    text = str(err)
    if isinstance(err, OverrideParseException):
        return parse_error_line(err, overrides)
    if isinstance(err, MissingConfigException):
        return unknown_option(err, overrides)
    if text.startswith("Ambiguous value for argument"):
        bad = text.split("'")[1] if "'" in text else ""  # the key=value Hydra names
        key = bad.split("=")[0]
        return (f"{bad} gives several values: add -m to run one job per value, or write a list as "
                f"{key}=[...] or a string as {key}='\"...\"'")
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        return unknown_override_key(str(cause.full_key), command, overrides)
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return bad_value(str(cause.full_key), cause, command)
    if isinstance(err, CompactHydraException) and cause is not None:
        return f"{first_line(err)}: {first_line(cause)}"
    return None


def group_options(group: str) -> List[str]:
    from bigmodel_cli.commands import CONFIG_DIR

    folder = Path(CONFIG_DIR) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


#: what people call the model kinds bigmodel ships under other names
KNOWN_AS = {"resnet": "cnn", "vgg": "cnn", "convnet": "cnn", "conv": "cnn", "lenet": "cnn",
            "lstm": "rnn", "gru": "rnn", "vit": "transformer", "bert": "transformer",
            "encoder": "transformer", "nanogpt": "gpt", "llm": "gpt", "gpt-2": "gpt2",
            "linear": "mlp", "ffn": "mlp", "perceptron": "mlp", "char": "text", "shakespeare": "text"}


#: Hydra plugins' configs that bigmodel's own options build on, and the extra that installs each
PLUGIN_EXTRAS = {"hydra/launcher/submitit_slurm": "slurm", "hydra/launcher/submitit_local": "slurm",
                 "hydra/launcher/joblib": "joblib", "hydra/sweeper/optuna": "optuna"}


def missing_plugin(missing: str, overrides: Sequence[str]) -> Optional[str]:
    """`hydra/sweeper=optuna` without Hydra's Optuna sweeper: which extra to install."""
    extra = PLUGIN_EXTRAS.get(missing)
    if extra is None:
        return None
    group = missing.rpartition("/")[0]
    chosen = next((o for o in overrides if o.lstrip("+").startswith(f"{group}=")), missing)
    return f"{chosen} needs a Hydra plugin that is not installed; pip install 'bigmodel[{extra}]'"


def unknown_option(err: Exception, overrides: Sequence[str] = ()) -> Optional[str]:
    """`model=resnet`: the nearest option, and all of them."""
    missing = str(getattr(err, "missing_cfg_file", "") or "")
    if "/" not in missing:
        return None
    plugin = missing_plugin(missing, overrides)
    if plugin is not None:
        return plugin
    group, _, option = missing.rpartition("/")
    options = list(getattr(err, "options", None) or group_options(group))
    if not options:
        return None
    close = [KNOWN_AS[option.lower()]] if KNOWN_AS.get(option.lower()) in options else \
        difflib.get_close_matches(option, options, n=1, cutoff=0.4)
    hint = f"did you mean {group}={close[0]}? " if close else ""
    own = " (or your own: model=custom model._target_=your.Module)" if group == "model" else ""
    return f"unknown {group} {option!r}; {hint}options: {', '.join(options)}{own}"


def top_level_groups(command: str, cfg: Optional[DictConfig] = None) -> List[str]:
    """The config groups of a command's defaults list (train: model, optim, ..., logger)."""
    from bigmodel_cli.config_keys import command_keys, takes_loggers

    if cfg is None:
        cfg = compose(command, [])
    chosen = [str(g) for g in cfg.hydra.runtime.choices if "/" not in str(g) and g != "hydra"]
    groups = chosen + (["logger"] if takes_loggers(command) else [])
    order = list(command_keys(command) or ())
    return sorted(groups, key=lambda g: order.index(g) if g in order else len(order))


def unknown_override_key(full_key: str, command: str, overrides: Sequence[str]) -> str:
    """`modle=cnn` (a group that does not exist) or `trainer.max_step=50` (a key that does not)."""
    from bigmodel_cli.config_keys import unknown_key_message

    if "." not in full_key:
        groups = top_level_groups(command)
        close = difflib.get_close_matches(full_key, groups, n=1, cutoff=0.5)
        given = next((o.split("=", 1)[1] for o in overrides if o.split("=")[0].lstrip("+~") == full_key), "")
        if close:
            return (f"unknown config group {full_key!r}; did you mean {close[0]}={given}? "
                    f"groups: {', '.join(groups)}")
    parent = full_key.rpartition(".")[0]
    rest = [o for o in overrides if not o.lstrip("+~").startswith(full_key)]
    try:
        node = OmegaConf.select(compose(command, rest), parent) if parent else compose(command, rest)
        allowed = [str(k) for k in node.keys() if not str(k).startswith("_") and k != "hydra"]
    except Exception:
        allowed = []
    return unknown_key_message(full_key, allowed, command)


def bad_value(full_key: str, cause: Exception, command: str) -> str:
    """`trainer.max_steps=abc`: what the key takes, and its default."""
    from bigmodel_cli.errors import first_line

    try:
        default = OmegaConf.select(compose(command, []), full_key)
        example = f"; e.g. {full_key}={'null' if default is None else default}"
    except Exception:
        example = ""
    reason = first_line(cause).replace("Invalid value", "value").replace("Value ", "value ")
    return f"bad value for {full_key}: {reason}{example}"

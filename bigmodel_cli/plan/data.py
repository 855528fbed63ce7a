"""What the plan needs from the data: its shape, one device's batch, batches per epoch.

The data set is set up as training would (cheap for the built-in sets; token files are
memory-mapped, not read), except where planning must not need it: data=tokens without
data.dir plans from data.vocab_size and data.block_size alone. A model that cannot read
the default data (model=gpt2 with data=digits, when no data was chosen) is planned on a
stand-in token stream, and the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from bigmodel_cli.build.parts import build_data
from bigmodel_cli.data.base import DataSpec
from bigmodel_cli.dotted_path import import_object
from bigmodel_cli.errors import UserError

#: the stand-in vocabulary: GPT-2's BPE, padded to a multiple of 64 (as nanoGPT trains it)
STAND_IN_VOCAB = 50304
#: GPT-2's own context and the batch its preset is run with (conf/model/gpt2.yaml, bench/)
STAND_IN_BLOCK, STAND_IN_BATCH = 1024, 16
STAND_IN = {"vocab_size": STAND_IN_VOCAB, "block_size": STAND_IN_BLOCK, "batch_size": STAND_IN_BATCH}


def stand_in_settings(overrides: Sequence[str]) -> dict:
    """The stand-in token data's sizes, with any data.vocab_size/block_size/batch_size given."""
    settings = dict(STAND_IN)
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        name = key.removeprefix("data.")
        if key.startswith("data.") and name in settings and value.isdigit() and int(value) > 0:
            settings[name] = int(value)
    return settings


def stand_in_overrides(overrides: Sequence[str]) -> str:
    """What `bigmodel train` needs besides the user's own overrides to read the stand-in."""
    given = {o.lstrip("+").partition("=")[0] for o in overrides}
    return " ".join(["data=tokens"] + [f"data.{k}={v}" for k, v in STAND_IN.items() if f"data.{k}" not in given])


@dataclass
class PlanData:
    spec: DataSpec
    unit: str  # samples | tokens
    units_per_sample: int
    batch_size: int  # per device and micro-step
    batches_per_epoch: Optional[int]  # per rank; None where the data is not at hand
    batch: Tuple[torch.Tensor, torch.Tensor]  # one device's micro-batch
    note: Optional[str] = None  # a stand-in, said in the plan


def plan_data(cfg: DictConfig, choices: dict, overrides: Sequence[str], world_size: int) -> PlanData:
    """The data of `cfg` as rank 0 of `world_size` would see it (cfg.data may be replaced by
    a stand-in, see above)."""
    data_cfg = cfg.data
    if str(data_cfg.get("_target_", "")).endswith("TokenFiles") and not data_cfg.get("dir"):
        return token_shape(data_cfg, world_size)
    kinds = model_input_kinds(cfg)
    chose_data = any(o.lstrip("+~").split("=")[0] in ("data", "experiment") for o in overrides)
    if kinds == ("tokens",) and not chose_data and data_unit(data_cfg) != "tokens":
        planned = token_shape(OmegaConf.create(stand_in_settings(overrides)), world_size)
        sizes = " ".join(f"data.{k}={v}" for k, v in stand_in_settings(overrides).items())
        planned.note = (f"model={choices.get('model') or 'this model'} reads tokens, not data="
                        f"{choices.get('data')}; planned with data=tokens {sizes} (give data=... to plan yours)")
        return planned
    data = build_data(data_cfg)
    loader = data.train_batches(seed=int(cfg.trainer.seed), rank=0, world_size=world_size)
    x, y = next(iter(loader))
    return PlanData(data.spec, data.unit, data.units_per_sample(), loader.batch_size, len(loader), (x, y))


def token_shape(data_cfg: DictConfig, world_size: int) -> PlanData:
    """A language-modelling batch of the configured size, no files needed."""
    vocab, block, batch = data_cfg.get("vocab_size"), int(data_cfg.block_size), int(data_cfg.batch_size)
    if not vocab:
        raise UserError("data=tokens without data.dir needs data.vocab_size to plan; e.g. data.vocab_size=50304 "
                        "(GPT-2 tokens), or data.dir=<prepared folder>")
    spec = DataSpec("language_modeling", "tokens", (block,), int(vocab), vocab_size=int(vocab), block_size=block)
    ids = torch.zeros(batch, block, dtype=torch.long)
    return PlanData(spec, "tokens", block, batch, None, (ids, ids.clone()))


def data_unit(data_cfg: DictConfig) -> str:
    """What a sample of this data set is made of (DataModule.unit), read from its class."""
    try:
        return str(getattr(import_object(str(data_cfg._target_)), "unit", "samples"))
    except Exception:  # build_data reports a data class that cannot be imported, in one line
        return "samples"


def model_input_kinds(cfg: DictConfig) -> tuple:
    try:
        return tuple(getattr(import_object(str(cfg.model._target_)), "input_kinds", ()))
    except Exception:  # build_model reports a model that cannot be imported, in one line
        return ()

"""A checkpoint in; measured, compressed, written to a new run dir, read back through the
inference loader (so the "after" numbers are those of what `bigmodel eval` loads) and
measured again. The input checkpoint is only ever read."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bigmodel_cli.build.inference import TrainedModel, open_trained, ready_model
from bigmodel_cli.build.parts import build_data, build_model
from bigmodel_cli.compress import quantize, weight_only
from bigmodel_cli.compress.checkpoint import save_compressed, size_on_disk
from bigmodel_cli.compress.finetune import finetune
from bigmodel_cli.compress.measure import CPU, Measurement, measure
from bigmodel_cli.compress.prune import make_permanent, prune_globally
from bigmodel_cli.compress.report import write_report
from bigmodel_cli.compress.structured import shrink
from bigmodel_cli.compress.weight_only import WEIGHT_ONLY
from bigmodel_cli.config import plain_config
from bigmodel_cli.config_checks import validate_compress_config, validate_data_config
from bigmodel_cli.data.base import DataModule
from bigmodel_cli.engine.checkpoint import check_weights_fit
from bigmodel_cli.engine.tasks import task_for
from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")


@dataclass
class Compressed:
    weights: Dict[str, torch.Tensor]  # what the new checkpoint stores
    model_config: Dict[str, Any]  # the model config that rebuilds them
    compression: Dict[str, Any]  # what was done, stored in the checkpoint's config
    kept: Dict[str, str] = field(default_factory=dict)  # layer -> why it was left as it was
    finetune: Dict[str, float] = field(default_factory=dict)  # validation metrics after the fine-tune


def compress_checkpoint(cfg: DictConfig, run_dir: Path) -> Dict[str, Any]:
    """`bigmodel compress`: returns the summary also written to compress.json."""

    validate_compress_config(cfg)
    cfg = plain_config(cfg)
    torch.set_num_threads(cfg.threads)
    finetuning = cfg.method == "prune" and cfg.prune.finetune_steps > 0
    trained = open_trained(cfg.ckpt, cfg.trusted_targets, ("model", "data", "optim") if finetuning else ("model", "data"))
    source = trained.checkpoint.path
    if quantize.quantized_layers(trained.checkpoint.config):
        raise UserError(f"checkpoint {source} is int8-quantized already; compress the checkpoint it was made from")
    data = checkpoint_data(trained)
    model = ready_model(trained, CPU, data.spec)
    task = task_for(data.spec.task)
    scheme = quantize.resolve_scheme(cfg.quantize.scheme, data.spec.task)
    check_scheme(scheme, cfg)
    layers = quantize.plan(model, cfg.quantize.per_channel, cfg.quantize.skip, scheme) if cfg.method == "quantize" else None
    log.info("measuring %s before compression", source)
    before = measure(model, model.state_dict(), data, task, cfg.split, cfg.latency_repeats, cfg.latency_warmup)
    before.file_bytes = size_on_disk(source)
    if layers is not None:
        compressed = quantize_model(model, trained, scheme, *layers)
    else:
        compressed = prune_model(model, trained, data, cfg, run_dir)
    path = save_compressed(trained.checkpoint, compressed.model_config, compressed.compression,
                           compressed.weights, run_dir)
    log.info("measuring %s, as bigmodel eval loads it", path)
    after = measure_saved(path, cfg, data)
    return write_report(run_dir, cfg, source, path, before, after, compressed)


def checkpoint_data(trained: TrainedModel) -> DataModule:
    """The checkpoint's own data, split as it was in training (as `bigmodel eval` builds it)."""

    validate_data_config(trained.config.data)
    data = build_data(trained.config.data, trained.checkpoint.data)
    data.to(CPU)
    return data


def measure_saved(path: Path, cfg: DictConfig, data: DataModule) -> Measurement:

    reread = open_trained(str(path), cfg.trusted_targets, ("model", "data"))
    model = ready_model(reread, CPU, data.spec)
    after = measure(model, reread.checkpoint.model, data, task_for(data.spec.task), cfg.split,
                    cfg.latency_repeats, cfg.latency_warmup)
    after.file_bytes = size_on_disk(path)
    return after


def check_scheme(scheme: str, cfg: DictConfig) -> None:

    if cfg.method == "quantize" and scheme == WEIGHT_ONLY and not cfg.quantize.per_channel:
        raise UserError("weight-only int8 always has one scale per output channel; drop quantize.per_channel=false, "
                        "or use quantize.scheme=dynamic for one scale per matrix")


def quantize_model(model: nn.Module, trained: TrainedModel, scheme: str, layers: Dict[str, str],
                   kept: Dict[str, str]) -> Compressed:
    """The int8 copy of `model` (left as it is) and the state dict the checkpoint stores."""


    by_reason: Dict[str, list] = {}
    for name, why in kept.items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        log.warning("kept in fp32: %s (%s)", ", ".join(names), why)
    if scheme == weight_only.WEIGHT_ONLY:
        weights = dict(weight_only.convert(copy.deepcopy(model), layers).state_dict())
        log.info("weight-only int8: %s", ", ".join(f"{name} (tied to {tied}: one int8 table for both)" if tied
                                                   else name for name, tied in layers.items()))
    else:
        weights = quantize.int8_state_dict(model, quantize.quantize(model, layers), layers)
        log.info("dynamic int8: %s", ", ".join(f"{name} ({scheme})" for name, scheme in layers.items()))
    return Compressed(weights, dict(trained.checkpoint.config["model"]),
                      quantize.compression_record(layers, kept, trained.checkpoint.path, scheme), kept)


def prune_model(model: nn.Module, trained: TrainedModel, data: DataModule, cfg: DictConfig,
                run_dir: Path) -> Compressed:
    """Prune (globally, or structured), fine-tune if asked, and make it permanent."""

    p = cfg.prune
    model_config = dict(trained.checkpoint.config["model"])
    compression = {"method": "prune", "amount": p.amount, "structured": p.structured,
                   "finetune_steps": p.finetune_steps, "source": str(trained.checkpoint.path)}
    chosen, kept = [], {}
    if p.structured:
        model = smaller_model(model, trained, data, model_config, p.amount)
    else:
        chosen, kept = prune_globally(model, p.amount)
    tuned = {}
    if p.finetune_steps:
        tuned = finetune(model, trained.config, data, p.finetune_steps, p.finetune_lr, cfg.threads, run_dir)
    make_permanent(chosen)
    return Compressed(dict(model.state_dict()), model_config, compression, kept, tuned)


def smaller_model(model: nn.Module, trained: TrainedModel, data: DataModule, model_config: Dict[str, Any],
                  amount: float) -> nn.Module:
    """The structurally pruned model, rebuilt from its smaller config (updated in place) as
    `bigmodel eval` will rebuild it."""

    choices = trained.checkpoint.choices
    weights, sizes = shrink(model, choices.get("model", ""), amount)
    log.info("structured pruning: %s", ", ".join(f"model.{k}: {model_config.get(k)} -> {v}" for k, v in sizes.items()))
    model_config.update(sizes)
    small = build_model(OmegaConf.create(model_config), data.spec, choices.get("model", ""), choices.get("data", ""))
    check_weights_fit(small, weights, trained.checkpoint.path)
    small.load_state_dict(weights)
    return small.eval()

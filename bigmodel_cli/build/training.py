"""Building a run: data, model, optimizer, schedule, telemetry and Trainer from a config.

`build_run` is what `bigmodel train` does before its first step, and what any command that
trains (or a test) calls to get a ready Trainer. It writes the run's config.yaml and
vocabulary, and resumes or seeds the weights as trainer.resume / trainer.init_from say;
the caller runs `run.trainer.fit()` and closes `run.telemetry`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bigmodel_cli.build.inference import open_trained, ready_model
from bigmodel_cli.build.parts import (build_data, build_model, build_optimizer, build_schedule, check_model_fits,
                                      count_parameters, engine_recomputes, human_count)
from bigmodel_cli.config import DistillConfig, TrainerConfig, plain_config, trainer_settings
from bigmodel_cli.data.base import DataModule
from bigmodel_cli.engine.checkpoint import Checkpoint, Provenance
from bigmodel_cli.engine.device import seed_everything, use_tf32, use_threads
from bigmodel_cli.engine.distill import Distillation, TaskObjective, mismatch
from bigmodel_cli.engine.distributed import DistEnv, unwrap
from bigmodel_cli.engine.mesh import build_mesh, layout_for
from bigmodel_cli.engine.parallelize import parallelize
from bigmodel_cli.engine.resume import config_changes, load_initial_weights, starting_checkpoint
from bigmodel_cli.engine.stopping import StopSignals
from bigmodel_cli.engine.tasks import Task, task_for
from bigmodel_cli.engine.trainer import RunContext, Trainer, TrainingParts
from bigmodel_cli.errors import UserError
from bigmodel_cli.telemetry import Telemetry, write_json
from bigmodel_cli.telemetry.console import attach_rank_log
from bigmodel_cli.telemetry.efficiency import model_flops_per_token

log = logging.getLogger("bigmodel")


@dataclass
class Run:
    trainer: Trainer
    telemetry: Telemetry
    config: DictConfig  # plain (enums as strings): what config.yaml and the checkpoints hold
    choices: Dict[str, str]  # {"model": ..., "data": ...}: the group options picked
    parameters: int
    resumed_from: Optional[Path] = None


@dataclass
class Placement:
    """Where a run's processes are: the device and the distributed world (one process by default)."""

    device: torch.device = torch.device("cpu")
    env: DistEnv = field(default_factory=DistEnv)
    signals: Optional[StopSignals] = None


def build_run(cfg: DictConfig, run_dir: Path, choices: Optional[Dict[str, str]] = None,
              place: Optional[Placement] = None, settings: Optional[TrainerConfig] = None) -> Run:
    """A ready Trainer for `cfg` (a validated config), writing into `run_dir` (which must
    exist). `settings` is cfg.trainer, typed (made from cfg when not given)."""

    place = place or Placement()
    settings = settings or trainer_settings(cfg)
    cfg = plain_config(cfg)  # enums as strings: the stored config must load with weights_only
    choices = {k: (choices or {}).get(k, "") for k in ("model", "data")}
    env = place.env
    log.info("config:\n%s", OmegaConf.to_yaml(cfg).rstrip())
    start = starting_checkpoint(settings.resume, run_dir, env)
    if start is not None:
        log_config_changes(start, cfg, settings, env)
    if env.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    use_threads(settings.threads, env)
    seed_everything(settings.seed, settings.deterministic)
    use_tf32(settings.tf32, place.device)
    data = build_run_data(cfg, run_dir, env)
    model, parameters = build_run_model(cfg, data, choices)
    parts = training_parts(cfg, settings, model, data, place)
    telemetry = Telemetry(run_dir, settings.progress, active=env.is_main, loggers=cfg.get("logger"),
                          resume_step=start.step if start is not None else 0)
    try:
        context = RunContext(run_dir, telemetry, place.device, env, place.signals,
                             Provenance(OmegaConf.to_container(cfg), choices, data.state_dict(), data.spec),
                             flops_per_unit(model, cfg, data, parameters))
        trainer = Trainer(parts, settings, context)
        start_from(trainer, start, settings)
    except BaseException:
        telemetry.close()
        raise
    return Run(trainer, telemetry, cfg, choices, parameters, start.path if start is not None else None)


def log_config_changes(start: Checkpoint, cfg: DictConfig, settings: TrainerConfig, env: DistEnv) -> None:
    """Refuses changes a resumed run cannot take; logs the others."""

    then = start.config.get("trainer", {}).get("parallel") or {}
    split_then = 1
    for key in ("tp", "pp"):  # (a stored config is read, not trusted: anything odd counts as 1)
        split_then *= then.get(key) if isinstance(then.get(key), int) and then.get(key) > 0 else 1
    replicas = (max(1, start.world_size // split_then), layout_for(env.world_size, settings.parallel).dp)
    changes = config_changes(start.config, OmegaConf.to_container(cfg), replicas)
    if changes:
        log.info("resuming with changed settings: %s", "; ".join(changes))


def build_run_data(cfg: DictConfig, run_dir: Path, env: DistEnv) -> DataModule:

    data = build_data(cfg.data)
    log.info("data: %s", data.describe())
    vocab = data.state_dict().get("vocab")
    if vocab is not None and env.is_main:
        write_json(run_dir / "vocab.json", vocab)
    return data


def build_run_model(cfg: DictConfig, data: DataModule, choices: Dict[str, str]):
    """The model for this data, checked to fit it; and its parameter count."""

    model = build_model(cfg.model, data.spec, choices["model"], choices["data"])
    check_model_fits(model, data, data.spec.task)
    n_params = count_parameters(model)
    log.info("model: %s with %s parameters (%s)", type(model).__name__, f"{n_params:,}", human_count(n_params))
    return model, n_params


def training_parts(cfg: DictConfig, settings: TrainerConfig, model: nn.Module, data: DataModule,
                   place: Placement) -> TrainingParts:
    """Model and data on the device, the model parallelized, and the optimizer over its
    (possibly sharded) parameters."""

    model.to(place.device)
    data.to(place.device)
    recompute = engine_recomputes(cfg.model)
    layout = layout_for(place.env.world_size, settings.parallel)
    mesh = build_mesh(layout, place.device)
    model = parallelize(model, settings, place.env, place.device, checkpoint_blocks=recompute, mesh=mesh)
    if place.env.is_distributed:  # same initial weights everywhere, but each replica its own dropout
        # (a replica's tp ranks hold the same activations between split layers: the same masks)
        torch.manual_seed(settings.seed + 1_000_003 * layout.coordinates(place.env.rank).dp)
    optimizer = build_optimizer(cfg.optim, model)
    schedule = partial(build_schedule, cfg.scheduler)
    task = task_for(data.spec.task)
    objective = training_objective(distill_settings(cfg), task, data, settings.precision, place.device)
    return TrainingParts(model, optimizer, schedule, data, task, mesh, objective)


def training_objective(settings: Optional[DistillConfig], task: Task, data: DataModule, precision: str,
                       device: torch.device):
    """The run's training objective: distillation when distill.teacher is set, else the task's loss."""
    if settings is None or not settings.teacher:
        return TaskObjective(task)
    teacher = teacher_for(settings, data, device)
    return Distillation(task, teacher, settings.temperature, settings.alpha, precision, device)


def teacher_for(settings: DistillConfig, data: DataModule, device: torch.device) -> nn.Module:
    """The teacher checkpoint's model, frozen and in eval mode on `device`, after checking
    that it was trained on this data's task, outputs and vocabulary."""
    trained = open_trained(settings.teacher, settings.trusted_targets, sections=("model",))
    problem = mismatch(trained.checkpoint.spec, data.spec, trained.checkpoint.data, data.state_dict())
    if problem:
        raise UserError(f"distill.teacher={settings.teacher} cannot teach this run: {problem}; "
                        "use a teacher trained on the same data")
    teacher = ready_model(trained, device)
    teacher.requires_grad_(False)
    return teacher


def distill_settings(cfg: DictConfig):
    """cfg.distill typed (None where the config has no distill node, e.g. built by hand)."""

    if cfg.get("distill") is None:
        return None
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DistillConfig), cfg.distill))


def flops_per_unit(model: nn.Module, cfg: DictConfig, data: DataModule, parameters: int) -> Optional[float]:

    return model_flops_per_token(unwrap(model), cfg.model, data.spec.task, data.spec.block_size, parameters)


def start_from(trainer: Trainer, start: Optional[Checkpoint], settings: TrainerConfig) -> None:
    """Continue from `start` (trainer.resume), or take trainer.init_from's weights."""

    if start is not None:
        trainer.load_checkpoint(start)
        log.info("resuming from %s at step %d of %d", start.path, trainer.step, trainer.total_steps)
    elif settings.init_from:
        source = load_initial_weights(trainer.raw_model, settings.init_from)
        log.info("weights from %s; optimizer and step start fresh", source)
    log.info("plan: %s", trainer.describe())


def rank_log(run_dir: Path, env: DistEnv, device: torch.device) -> None:
    """Under several processes, each rank logs to its own file (rank 0 also to the console)."""

    if env.is_distributed:
        attach_rank_log(run_dir, env.rank, console=env.is_main)
        log.info("rank %d of %d (%s), pid %d, device %s", env.rank, env.world_size, env.source, os.getpid(), device)

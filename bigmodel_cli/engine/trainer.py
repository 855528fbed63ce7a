"""The training loop: a plain loop over optimizer steps, with evaluation and checkpoints.

The Trainer knows nothing of which model it trains or where its numbers are shown:
it gets a model (already wrapped by `distributed.parallelize`), an optimizer and
schedule, a data module and a task (loss + metrics), and reports to a Telemetry object.
Under several processes every rank runs this loop on its own share of the data; only
rank 0 writes checkpoints.

Hot path rule: no host synchronisation per step. The loss is accumulated as a device
tensor and read (`.item()`) only every `log_every` steps.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from bigmodel_cli.data.base import DataModule
from bigmodel_cli.engine import distributed
from bigmodel_cli.engine.distributed import DistEnv
from bigmodel_cli.engine.checkpoint import (CHECKPOINT_DIR, SHARDED_SUFFIX, copy_checkpoint, copy_sharded,
                                           load_checkpoint, load_sharded_model, save_checkpoint, save_sharded)
from bigmodel_cli.engine.device import autocast
from bigmodel_cli.engine.tasks import Task
from bigmodel_cli.errors import UserError
from bigmodel_cli.telemetry import Telemetry

log = logging.getLogger("bigmodel")


class Monitor:
    """Tracks the best value of one validation metric, e.g. 'val/loss' (min)."""

    def __init__(self, name: str, mode: str, task: Task):
        split, _, metric = name.partition("/")
        allowed = [f"val/{m}" for m in task.metrics]
        if split != "val" or metric not in task.metrics:
            raise UserError(f"trainer.monitor={name} is not a validation metric of this "
                            f"{task.name} task; choose one of {', '.join(allowed)}")
        self.name, self.metric = name, metric
        self.maximize = task.metrics[metric] if mode == "auto" else mode == "max"
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None

    def update(self, metrics: Dict[str, float], step: int) -> bool:
        """Record the metrics of an evaluation; True when they are the best so far."""
        value = metrics[self.metric]
        if math.isnan(value):
            return False
        better = self.best is None or (value > self.best if self.maximize else value < self.best)
        if better:
            self.best, self.best_step = value, step
        return better

    def state_dict(self) -> Dict[str, Any]:
        return {"metric": self.name, "value": self.best, "step": self.best_step}


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule_factory: Callable[..., Callable[[int], float]], data: DataModule,
                 task: Task, cfg: DictConfig, device: torch.device, run_dir: Path,
                 telemetry: Telemetry, checkpoint_extra: Optional[Dict[str, Any]] = None,
                 env: DistEnv = DistEnv()):
        self.model = model
        self.raw_model = distributed.unwrap(model)  # what checkpoints hold
        self.sharded = distributed.is_sharded(model) if env.is_distributed else False
        self.env = env
        self.optimizer = optimizer
        self.data = data
        self.task = task
        self.cfg = cfg
        self.device = device
        self.precision = cfg.precision
        self.telemetry = telemetry
        self.checkpoint_dir = run_dir / CHECKPOINT_DIR
        self.checkpoint_extra = checkpoint_extra or {}
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.monitor = Monitor(cfg.monitor, cfg.monitor_mode, task)

        self.accum = cfg.grad_accum_steps
        self.train_loader = data.train_batches(seed=cfg.seed, rank=env.rank, world_size=env.world_size)
        for split in ("val", "test"):  # the last rank's share is the smallest; all ranks agree
            if len(data.eval_batches(split, rank=env.world_size - 1, world_size=env.world_size)) == 0:
                raise UserError(f"the {split} split is too small to share across {env.world_size} ranks; "
                                "use more data or fewer trainer.devices")
        # Optimizer steps per pass over the training data (fractional when accumulation
        # spans more micro-batches than an epoch has).
        self.steps_per_epoch = len(self.train_loader) / self.accum
        self.total_steps = self.plan_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, schedule_factory(total_steps=self.total_steps))
        # Across all ranks: the effective global batch.
        self.units_per_step = self.train_loader.batch_size * data.units_per_sample() * self.accum * env.world_size
        self.step = 0
        self.epoch = 0
        self.last_lr = optimizer.param_groups[0]["lr"]
        self.params = [p for p in model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ planning
    def plan_steps(self) -> int:
        limits = []
        if self.cfg.max_steps is not None:
            limits.append(self.cfg.max_steps)
        if self.cfg.max_epochs is not None:
            limits.append(max(1, math.ceil(self.cfg.max_epochs * self.steps_per_epoch)))
        return min(limits)

    def describe(self) -> str:
        return (f"{self.total_steps:,} optimizer steps ({self.total_steps / self.steps_per_epoch:.1f} epochs "
                f"of {self.steps_per_epoch:,.4g} steps); {self.units_per_step:,} {self.data.unit} per step "
                f"(batch {self.train_loader.batch_size} per device x {self.env.world_size} devices "
                f"x accumulation {self.accum}); "
                f"device {self.device}, precision {self.precision}")

    # ------------------------------------------------------------------ the loop
    def micro_batches(self) -> Iterator:
        """An endless stream of training batches, epoch after epoch."""
        while True:
            self.train_loader.set_epoch(self.epoch)
            yield from self.train_loader
            self.epoch += 1

    def train_step(self, batches: Iterator, want_grad_norm: bool):
        """One optimizer step over `accum` micro-batches. Returns (mean loss, grad norm) as
        device tensors (grad norm is None unless clipping or asked for)."""
        loss_total = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = next(batches)
            # Gradients are reduced across ranks on the last micro-batch only.
            with distributed.gradient_sync(self.model, enabled=micro == self.accum - 1):
                with autocast(self.precision, self.device):
                    output = self.model(x)
                loss = self.task.loss(output, y)
                self.scaler.scale(loss / self.accum).backward()
            loss_total += loss.detach()
        grad_norm = None
        if self.cfg.grad_clip is not None or want_grad_norm:
            self.scaler.unscale_(self.optimizer)
            max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
            grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_total / self.accum, grad_norm

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        batches = self.micro_batches()
        self.telemetry.start(self.total_steps)
        loss_sum = torch.zeros((), device=self.device)
        steps_since_log, last_log_time = 0, time.perf_counter()
        val_metrics: Dict[str, float] = {}
        if cfg.val_at_start:  # the untrained baseline, e.g. ln(vocab) for a language model
            self.telemetry.eval(0, "val", self.evaluate("val", cfg.eval_batches))
            last_log_time = time.perf_counter()
        while self.step < self.total_steps:
            is_log_step = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == self.total_steps
            loss, grad_norm = self.train_step(batches, want_grad_norm=is_log_step)
            self.step += 1
            loss_sum += loss
            steps_since_log += 1
            if is_log_step:
                self.log_train(loss_sum / steps_since_log, grad_norm, steps_since_log, last_log_time)
                loss_sum.zero_()
                steps_since_log = 0
                last_log_time = time.perf_counter()
            if self.step % cfg.val_every == 0 or self.step == self.total_steps:
                val_metrics = self.validate()
                last_log_time = time.perf_counter()  # evaluation time is not training throughput
        return {"steps": self.step, "epochs": round(self.step / self.steps_per_epoch, 3),
                "val": val_metrics, "best": self.monitor.state_dict()}

    def log_train(self, mean_loss: torch.Tensor, grad_norm: Optional[torch.Tensor], steps: int,
                  since: float) -> None:
        """Report one log interval. The single host sync of the interval happens here."""
        # Gradients are synchronised, so the norm is already global; the loss is per rank.
        mean_loss = distributed.all_reduce_sum(mean_loss.detach().clone()) / self.env.world_size
        values = torch.stack([mean_loss, grad_norm if grad_norm is not None else mean_loss]).tolist()
        elapsed = time.perf_counter() - since  # after the sync: the device work is done
        loss = values[0]
        if not math.isfinite(loss):
            raise UserError(f"training loss became {loss} by step {self.step}; lower "
                            f"optim.lr (now {self.last_lr:.3g}) or set trainer.grad_clip")
        metrics = {"epoch": round(self.step / self.steps_per_epoch, 3), "loss": loss, "lr": self.last_lr}
        if grad_norm is not None:
            metrics["grad_norm"] = values[1]
        metrics[f"{self.data.unit}_per_s"] = self.units_per_step * steps / elapsed
        self.telemetry.train(self.step, metrics)

    def validate(self) -> Dict[str, float]:
        metrics = self.evaluate("val", self.cfg.eval_batches)
        self.telemetry.eval(self.step, "val", metrics)
        if not math.isfinite(metrics["loss"]):  # never checkpoint diverged weights
            raise UserError(f"validation loss became {metrics['loss']} at step {self.step}; lower "
                            f"optim.lr (now {self.last_lr:.3g}) or set trainer.grad_clip")
        is_best = self.monitor.update(metrics, self.step)
        if self.cfg.save_checkpoints:
            self.save(is_best)
        return metrics

    def save(self, is_best: bool) -> None:
        if self.sharded:  # every rank writes its own shards
            last = self.checkpoint_dir / f"last{SHARDED_SUFFIX}"
            save_sharded(self.state_dict(), self.model, self.optimizer, last)
            if is_best:
                copy_sharded(last, self.checkpoint_dir / f"best{SHARDED_SUFFIX}")
        elif self.env.is_main:
            save_checkpoint(self.state_dict(), self.checkpoint_dir / "last.pt")
            if is_best:
                copy_checkpoint(self.checkpoint_dir / "last.pt", self.checkpoint_dir / "best.pt")

    @torch.no_grad()
    def evaluate(self, split: str, max_batches: Optional[int] = None) -> Dict[str, float]:
        if self.env.is_distributed:
            distributed.sync_buffers(self.raw_model)
        was_training = self.model.training
        self.model.eval()  # (the wrapper and the model share their modules)
        # The unwrapped model: DDP's forward would sync buffers, and ranks may run different
        # numbers of eval batches.
        metrics = evaluate_model(self.raw_model, self.data, self.task, split, self.precision,
                                 self.device, max_batches, self.env)
        self.model.train(was_training)
        return metrics

    def restore_best(self) -> bool:
        """Load the best checkpoint's weights (for the final test); False if there is none."""
        path = self.checkpoint_dir / (f"best{SHARDED_SUFFIX}" if self.sharded else "best.pt")
        # Rank 0 wrote it and decides; loading is then done by every rank (shared disk).
        if not distributed.broadcast_from_main(path.exists()):
            return False
        if self.sharded:
            load_sharded_model(self.model, path)
            return True
        self.raw_model.load_state_dict(load_checkpoint(path)["model"])
        return True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        # Sharded runs keep model and optimizer in the DCP shards, not here.
        weights = {} if self.sharded else {"model": self.raw_model.state_dict(),
                                           "optimizer": self.optimizer.state_dict()}
        return {
            **weights,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "best": self.monitor.state_dict(),
            **self.checkpoint_extra,
        }


@torch.no_grad()
def evaluate_model(model: nn.Module, data: DataModule, task: Task, split: str, precision: str,
                   device: torch.device, max_batches: Optional[int] = None,
                   env: DistEnv = DistEnv()) -> Dict[str, float]:
    """Metrics over a split (or its first `max_batches` batches per rank); one host sync at
    the end. Ranks evaluate disjoint shares and sum them, so each sample counts once."""
    loader = data.eval_batches(split, rank=env.rank, world_size=env.world_size)
    count = len(loader) if max_batches is None else min(len(loader), max_batches)
    # Under FSDP every forward is a collective, so all ranks must run as many; a rank with
    # fewer batches repeats its last one and does not count it.
    forwards = distributed.all_reduce_max(count, device) if distributed.is_sharded(model) else count
    sums, batches, batch = None, iter(loader), None
    for i in range(forwards):
        if i < count:
            batch = next(batches)
        x, y = batch
        with autocast(precision, device):
            output = model(x)
        if i < count:
            stats = task.batch_sums(output, y)
            sums = stats if sums is None else sums + stats
    if sums is None:
        raise UserError(f"the {split} split is empty")
    return task.finalize(distributed.all_reduce_sum(sums))

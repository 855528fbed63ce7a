"""The training loop: a plain loop over optimizer steps, with evaluation and checkpoints.

The Trainer knows nothing of which model it trains or where its numbers are shown:
it gets a model (already through `engine.parallelize`), an optimizer and
schedule, a data module and a task (loss + metrics), and reports to a Telemetry object.
Under several processes every rank runs this loop on its own share of the data; only
rank 0 writes files.

Hot path rule: no host synchronisation per step. The loss is accumulated as a device
tensor and read (`.item()`) only every `log_every` steps; a non-finite loss or gradient
is remembered on the device and checked then, and before every checkpoint.

Exact resume: a checkpoint holds everything the next step depends on (weights, optimizer,
schedule, scaler, step, every rank's RNG states, the data position), so a resumed run
continues with the very numbers an uninterrupted one would have produced.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Union

import torch
from torch import nn

from bigmodel_cli.config import NonFinite, Precision, TrainerConfig
from bigmodel_cli.data.base import DataModule
from bigmodel_cli.engine import distributed
from bigmodel_cli.engine.checkpoint import (Checkpoint, CheckpointRecord, Provenance, load_checkpoint,
                                           load_model_and_optimizer, load_weights)
from bigmodel_cli.engine.checkpoint_manager import CheckpointManager
from bigmodel_cli.engine.device import autocast
from bigmodel_cli.engine.distill import TaskObjective
from bigmodel_cli.engine.distributed import DistEnv
from bigmodel_cli.engine.resume import hyperparameters, reapply_hyperparameters
from bigmodel_cli.engine.rng import capture_rng_state, restore_rng_state
from bigmodel_cli.engine.mesh import DataShare, data_share, layout_for
from bigmodel_cli.engine.parallelize import replicated_by_hand
from bigmodel_cli.engine.pipeline import cut_of
from bigmodel_cli.engine.pipeline_step import pipeline_step_for
from bigmodel_cli.engine.logits import logits_of
from bigmodel_cli.engine.fit_result import FitResult, StopAction, StopCause, Stopped
from bigmodel_cli.engine.stopping import CHECKPOINT, NOTHING, SAVE, STOP, StopAgreement, StopSignals
from bigmodel_cli.engine.tasks import Task
from bigmodel_cli.errors import Diverged, UserError, first_line
from bigmodel_cli.optim import TorchSchedule, load_scheduler_state, lr_scheduler, scheduler_state
from bigmodel_cli.slurm import slurm_job_id
from bigmodel_cli.telemetry import Telemetry
from bigmodel_cli.telemetry.efficiency import held_bytes, peak_flops, peak_memory_mb
from bigmodel_cli.telemetry.time_left import TimeLeft, human_duration

log = logging.getLogger("bigmodel")


class Monitor:
    """Tracks the best value of one validation metric, e.g. 'val/loss' (min), and how many
    validations in a row it has not improved by more than `min_delta` (early stopping)."""

    def __init__(self, name: str, mode: str, task: Task, min_delta: float = 0.0):
        split, _, metric = name.partition("/")
        allowed = [f"val/{m}" for m in task.metrics]
        if split != "val" or metric not in task.metrics:
            raise UserError(f"trainer.monitor={name} is not a validation metric of this "
                            f"{task.name} task; choose one of {', '.join(allowed)}")
        self.name, self.metric, self.min_delta = name, metric, min_delta
        self.maximize = task.metrics[metric] if mode == "auto" else mode == "max"
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.stale = 0  # validations since the last improvement by more than min_delta
        self.reference: Optional[float] = None  # the value that improvement is measured from

    def update(self, metrics: Dict[str, float], step: int) -> bool:
        """Record the metrics of an evaluation; True when they are the best so far."""
        value = metrics[self.metric]
        if math.isnan(value):
            self.stale += 1
            return False
        better = self.best is None or (value > self.best if self.maximize else value < self.best)
        if better:
            self.best, self.best_step = value, step
        gain = None if self.reference is None else (value - self.reference if self.maximize else self.reference - value)
        if gain is None or gain > self.min_delta:
            self.reference, self.stale = value, 0
        else:
            self.stale += 1
        return better

    def state_dict(self) -> Dict[str, Any]:
        return {"metric": self.name, "value": self.best, "step": self.best_step, "stale": self.stale,
                "reference": self.reference}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("metric") == self.name:  # a changed trainer.monitor starts afresh
            self.best, self.best_step = state["value"], state["step"]
            # (checkpoints from before early stopping: counting starts again from their best)
            stale, reference = state.get("stale", 0), state.get("reference", state["value"])
            self.stale = stale if isinstance(stale, int) and stale >= 0 else 0
            self.reference = reference if isinstance(reference, (int, float)) else self.best


@dataclass
class TrainingParts:
    """What a Trainer trains: made by `bigmodel_cli.build.training.build_run`, or by hand in a test."""

    model: nn.Module  # already through `engine.parallelize`
    optimizer: torch.optim.Optimizer
    # schedule(total_steps=N) -> lr multiplier per step, or a TorchSchedule (optim.lr_scheduler)
    schedule: Callable[..., Union[Callable[[int], float], TorchSchedule]]
    data: DataModule
    task: Task
    mesh: Optional[Any] = None  # the run's DeviceMesh ("pp", "dp", "tp"); None in one process
    # objective(x, output, y) -> (loss, its named terms to log, or None), e.g. distillation
    # (engine/distill.py); None: the task's own loss.
    objective: Optional[Callable] = None


@dataclass
class RunContext:
    """Where a run happens and what watches it."""

    run_dir: Path
    telemetry: Telemetry
    device: torch.device = torch.device("cpu")
    env: DistEnv = field(default_factory=DistEnv)
    signals: Optional[StopSignals] = None  # installed by the caller for the whole run
    provenance: Optional[Provenance] = None  # what built the run, stored in its checkpoints
    flops_per_unit: Optional[float] = None  # the model's FLOPs per token (for MFU), where known


class Trainer:
    def __init__(self, parts: TrainingParts, settings: TrainerConfig, context: RunContext):
        self.settings, self.data, self.task = settings, parts.data, parts.task
        self.objective = parts.objective or TaskObjective(parts.task)
        self.env, self.device, self.telemetry = context.env, context.device, context.telemetry
        self.model, self.optimizer = parts.model, parts.optimizer
        self.raw_model = distributed.unwrap(parts.model)  # what checkpoints hold
        self.state_model = distributed.uncompiled(parts.model)  # what sharded (DCP) checkpoints hold
        self.mesh = parts.mesh
        # Split across ranks (FSDP shards, tensor-parallel layers, pipeline stages): sharded
        # checkpoints, written by every rank.
        self.sharded = (distributed.holds_dtensors(parts.model) or cut_of(self.raw_model) is not None
                        if self.env.is_distributed else False)
        self.precision = settings.precision
        self.provenance = context.provenance or Provenance({}, {}, {}, parts.data.spec)
        self.checkpoints = CheckpointManager(context.run_dir, self.sharded, settings.keep_last,
                                             settings.checkpoint_every, settings.checkpoint_every_min,
                                             enabled=settings.save_checkpoints)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == Precision.fp16)
        self.monitor = Monitor(settings.monitor, settings.monitor_mode, parts.task, settings.early_stopping.min_delta)
        # The ranks' layout over (pp, dp, tp), and this rank's share of the data (its replica's).
        self.layout = layout_for(self.env.world_size, settings.parallel)
        self.share = data_share(self.layout, self.env.rank)
        # The ranks of this rank's data-parallel group: they read different batches, so losses and
        # evaluation sums are reduced over them (a replica's tp ranks hold the same numbers).
        self.dp_group = parts.mesh.get_group("dp") if parts.mesh is not None else None
        self.average_by_hand = replicated_by_hand(settings, self.layout.dp)  # (ddp over a tp-split model)
        # Read per step: plain attributes.
        self.accum: int = settings.grad_accum_steps
        self.grad_clip: Optional[float] = settings.grad_clip
        self.log_every: int = settings.log_every
        self.val_every: int = settings.val_every
        self.skip_nonfinite = settings.on_nonfinite == NonFinite.skip
        self.train_loader = self.plan_data()
        self.total_steps = self.plan_steps()
        self.scheduler = lr_scheduler(self.optimizer, parts.schedule(total_steps=self.total_steps))
        self.configured_hyperparameters = hyperparameters(self.optimizer)
        self.step = 0
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # The losses summed since the last log step, on the device: a non-finite step makes
        # the sum non-finite, so reading it at log steps (and before saves) finds it.
        self.loss_sum = torch.zeros((), device=self.device)
        self.terms_sum = torch.zeros(len(self.objective.terms), device=self.device)  # the objective's terms
        self.finite_until = 0  # last step known to be finite
        self.skipped_steps = 0
        self.resumed_rng: Optional[Dict[str, Any]] = None
        self.signals = context.signals or StopSignals()
        # Efficiency figures: MFU only where both the model's FLOPs and the device's peak are known.
        self.flops_per_unit = context.flops_per_unit
        self.peak_flops = peak_flops(self.device, self.precision)
        self.data_wait_s = 0.0  # host time spent fetching batches in this log interval
        self.rate_probe: Optional[tuple] = None  # (step, time) after the first, warm-up step
        self.time_left = TimeLeft()
        # trainer.parallel.pp > 1: steps and evaluation run through the pipeline's stages.
        self.pipeline = pipeline_step_for(self) if self.layout.pp > 1 else None
        self.memory_logged = False

    # ------------------------------------------------------------------ planning
    def plan_data(self):
        """This rank's training batches, after checking every rank gets evaluation batches."""
        share = self.share
        loader = self.data.train_batches(seed=self.settings.seed, rank=share.rank, world_size=share.world_size)
        for split in ("val", "test"):  # the last replica's share is the smallest; all ranks agree
            if len(self.data.eval_batches(split, rank=share.world_size - 1, world_size=share.world_size)) == 0:
                raise UserError(f"the {split} split is too small to share across {share.world_size} data-parallel "
                                "ranks; use more data or fewer trainer.devices")
        # Optimizer steps per pass over the training data (fractional when accumulation
        # spans more micro-batches than an epoch has).
        self.steps_per_epoch = len(loader) / self.accum
        # Across all ranks: the effective global batch.
        self.units_per_step = loader.batch_size * self.data.units_per_sample() * self.accum * share.world_size
        return loader

    def plan_steps(self) -> int:
        limits = []
        if self.settings.max_steps is not None:
            limits.append(self.settings.max_steps)
        if self.settings.max_epochs is not None:
            limits.append(max(1, math.ceil(self.settings.max_epochs * self.steps_per_epoch)))
        return min(limits)

    def describe(self) -> str:
        return (f"{self.total_steps:,} optimizer steps ({self.total_steps / self.steps_per_epoch:.1f} epochs "
                f"of {self.steps_per_epoch:,.4g} steps); {self.units_per_step:,} {self.data.unit} per step "
                f"(batch {self.train_loader.batch_size} per replica x {self.share.world_size} replicas "
                f"x accumulation {self.accum}); "
                f"device {self.device}, precision {self.precision}")

    def data_position(self) -> Dict[str, int]:
        """Where in the training stream the next step starts: every step consumes `accum`
        micro-batches and every epoch has the same number, so the step alone fixes it."""
        epoch, batch = divmod(self.step * self.accum, len(self.train_loader))
        return {"epoch": epoch, "batch": batch, "batches_per_epoch": len(self.train_loader),
                "sampler": self.data.sampler_version}

    # ------------------------------------------------------------------ the loop
    def micro_batches(self) -> Iterator:
        """An endless stream of training batches, epoch after epoch, from the data position."""
        position = self.data_position()
        epoch, start = position["epoch"], position["batch"]
        while True:
            self.train_loader.set_epoch(epoch, start)
            yield from self.train_loader
            epoch, start = epoch + 1, 0

    def train_step(self, batches: Iterator, want_grad_norm: bool):
        """One optimizer step over `accum` micro-batches. Returns (mean loss, grad norm) as
        device tensors (grad norm is None unless clipping or asked for)."""
        if self.pipeline is not None:
            return self.pipeline.train_step(batches, want_grad_norm)
        loss_total = None
        for micro in range(self.accum):
            x, y = self.next_batch(batches)
            # Gradients are reduced across ranks on the last micro-batch only.
            with distributed.gradient_sync(self.model, enabled=micro == self.accum - 1):
                with autocast(self.precision, self.device):
                    output = logits_of(self.model(x))
                loss, terms = self.objective(x, output, y)
                self.scaler.scale(loss / self.accum).backward()
            if terms is not None:
                self.terms_sum += terms / self.accum
            loss_total = loss.detach() if loss_total is None else loss_total + loss.detach()
        if self.average_by_hand:
            grads = [distributed.local_part(p.grad) for p in self.params if p.grad is not None]
            distributed.average_over_replicas(grads, self.dp_group, self.layout.dp)
        grad_norm = None
        if self.grad_clip is not None or want_grad_norm or self.skip_nonfinite:
            self.scaler.unscale_(self.optimizer)
            max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
            grad_norm = distributed.clip_grad_norm(self.params, max_norm)
        self.apply_update(grad_norm)
        return (loss_total if self.accum == 1 else loss_total / self.accum), grad_norm

    def next_batch(self, batches: Iterator):
        fetch_start = time.perf_counter()
        batch = next(batches)
        self.data_wait_s += time.perf_counter() - fetch_start
        return batch

    def apply_update(self, grad_norm: Optional[torch.Tensor]) -> None:
        """The optimizer and schedule step on the gradients (skipped where they are not finite
        and trainer.on_nonfinite=skip)."""
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        # The norm is of the all-reduced gradients, so every rank takes the same decision.
        if self.skip_nonfinite and not torch.isfinite(grad_norm).item():  # the one per-step sync
            self.skipped_steps += 1
            log.warning("step %d: non-finite gradients, update skipped (%d skipped so far)",
                        self.step + 1, self.skipped_steps)
            self.scaler.update()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if not self.memory_logged:  # the first step of this process: gradients and state exist now
            self.log_memory()
            self.memory_logged = True
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def log_layout(self) -> None:
        """Once, at start (every rank, into its own log): how the ranks divide the work."""
        if not self.env.is_distributed:
            return
        at = self.layout.coordinates(self.env.rank)
        log.info("parallel layout: %s under trainer.strategy=%s; rank %d is at pp=%d dp=%d tp=%d",
                 self.layout.describe(), self.settings.strategy, self.env.rank, at.pp, at.dp, at.tp)

    def log_memory(self) -> None:
        """After the first step's backward (every rank, into its own log): what this rank holds."""
        held = held_bytes(self.model, self.optimizer)
        peak = f"; CUDA max allocated {peak_memory_mb(self.device):,.1f} MiB" if self.device.type == "cuda" else ""
        log.info("memory on rank %d: parameters %s, gradients %s, optimizer state %s%s", self.env.rank,
                 *(f"{held[k] / 2**20:,.2f} MiB" for k in ("params", "grads", "optimizer")), peak)

    def fit(self) -> FitResult:
        cfg = self.settings
        self.model.train()
        batches = self.micro_batches()
        self.telemetry.start(self.total_steps, self.step)
        self.log_layout()
        self.loss_sum.zero_()
        self.terms_sum.zero_()
        steps_since_log, last_log_time = 0, time.perf_counter()
        val_metrics: Dict[str, float] = {}
        if cfg.val_at_start and self.step == 0:  # the untrained baseline, e.g. ln(vocab) for an LM
            self.telemetry.eval(0, "val", self.evaluate("val", cfg.eval_batches))
            last_log_time = time.perf_counter()
        if self.resumed_rng is not None:
            try:
                restore_rng_state(self.resumed_rng)
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
                raise UserError(f"the checkpoint's random number generator state is damaged ({type(err).__name__}: "
                                f"{first_line(err)}); use another checkpoint") from None
        agreement = StopAgreement(self.env.is_distributed, cfg.dist_timeout_s)
        stopped: Optional[Stopped] = None
        early_stop: Optional[str] = None
        try:
            if agreement.now(self.signals.request) == STOP:  # it came while setting up
                return self.fit_result({}, self.stopped(StopAction.STOP_AT_START, None))
            while self.step < self.total_steps:
                is_log_step = (self.step + 1) % self.log_every == 0 or self.step + 1 == self.total_steps
                loss, grad_norm = self.train_step(batches, want_grad_norm=is_log_step)
                self.step += 1
                self.announce_speed(loss)
                self.loss_sum += loss
                steps_since_log += 1
                if is_log_step:
                    self.log_train(self.loss_sum / steps_since_log, grad_norm, steps_since_log, last_log_time)
                    self.loss_sum.zero_()
                    steps_since_log = 0
                    last_log_time = time.perf_counter()
                if self.step % self.val_every == 0 or self.step == self.total_steps:
                    val_metrics = self.validate()
                    last_log_time = time.perf_counter()  # evaluation time is not training throughput
                    early_stop = self.stalled()
                    if early_stop:  # every rank saw the same reduced metrics: all stop here
                        break
                elif self.checkpoints.due_by_steps(self.step):
                    self.save()
                    last_log_time = time.perf_counter()
                request = self.signals.take()
                if request == NOTHING and self.env.is_main and self.checkpoints.due_by_time():
                    request = SAVE
                stopped = self.act_on(agreement.poll(request))
                if stopped:
                    break
        finally:
            try:
                agreement.close()
            finally:
                batches.close()  # ends a background prefetch thread, if the loader has one
        return self.fit_result(val_metrics, stopped, early_stop)

    def stalled(self) -> Optional[str]:
        """Why training ends early (trainer.early_stopping), or None to go on."""
        patience = self.settings.early_stopping.patience
        if patience is None or self.monitor.stale < patience:
            return None
        best = "none yet" if self.monitor.best is None else \
            f"{self.monitor.best:.4g} at step {self.monitor.best_step}"
        reason = (f"early stopping: {self.monitor.name} has not improved by more than "
                  f"{self.monitor.min_delta:g} in {self.monitor.stale} validations (best {best})")
        log.info("%s; stopping at step %d of %d", reason, self.step, self.total_steps)
        return reason

    def announce_speed(self, loss: torch.Tensor, after: int = 10) -> None:
        """Once, early: the measured steps/s over `after` steps after the warm-up step and
        a first estimate of the time left (two host syncs in the whole run); the log lines
        then keep the estimate up to date."""
        if self.rate_probe is None:
            loss.item()
            self.rate_probe = (self.step, time.perf_counter())
            self.time_left.mark(self.step)
            log.debug("first optimizer step done (unix time %.3f)", time.time())
        elif self.rate_probe[0] is not None and self.step == self.rate_probe[0] + after:
            loss.item()
            rate = after / (time.perf_counter() - self.rate_probe[1])
            self.rate_probe = (None, 0.0)
            left = self.total_steps - self.step
            log.info("speed: %.3g steps/s over %d steps; about %s for the remaining %d (an estimate, "
                     "evaluation aside; the log lines or the progress bar keep it up to date)",
                     rate, after, human_duration(left / rate), left)

    def fit_result(self, val_metrics: Dict[str, float], stopped: Optional[Stopped],
                   early_stop: Optional[str] = None) -> FitResult:
        return FitResult(steps=self.step, epochs=round(self.step / self.steps_per_epoch, 3), val=val_metrics,
                         best=self.monitor.state_dict(), skipped_steps=self.skipped_steps, stopped=stopped,
                         early_stop=early_stop)

    def stopped(self, action: StopAction, checkpoint: Optional[Path]) -> Stopped:
        return Stopped(StopCause.of(self.signals.signal_name), action, self.step, checkpoint)

    def act_on(self, request: int) -> Optional[Stopped]:
        """Carry out an agreed stop or checkpoint request; a Stopped when the loop must end
        (to requeue a Slurm job is the command's part, once the loop is over)."""
        if request == NOTHING:
            return None
        path = self.save()
        if request == SAVE:  # trainer.checkpoint_every_min: saved, and training goes on
            return None
        job_id = slurm_job_id()
        if request == CHECKPOINT and not (job_id and self.settings.requeue_command):
            if self.signals.signal_name:  # this rank got the signal: say what happened
                where = f"checkpoint {path}" if path else "no checkpoint (trainer.save_checkpoints=false)"
                log.info("step %d: %s wrote %s; training goes on", self.step, self.signals.signal_name, where)
            self.signals.signal_name = None
            return None
        return self.stopped(StopAction.REQUEUE if request == CHECKPOINT else StopAction.STOP, path)

    def log_train(self, mean_loss: torch.Tensor, grad_norm: Optional[torch.Tensor], steps: int,
                  since: float) -> None:
        """Report one log interval. The single host sync of the interval happens here."""
        # Gradients are synchronised, so the norm is already global; loss and terms are per rank
        # (a pipeline's loss is its last stage's, and it has no objective terms).
        local = torch.cat([mean_loss.detach().reshape(1), self.terms_sum / steps])
        means = (self.pipeline.global_loss(mean_loss).reshape(1) if self.pipeline is not None
                 else distributed.all_reduce_sum(local, self.dp_group) / self.share.world_size)
        self.terms_sum.zero_()
        values = torch.cat([means, (grad_norm if grad_norm is not None else means[0]).reshape(1)]).tolist()
        terms, values = dict(zip(self.objective.terms, values[1:-1])), [values[0], values[-1]]
        elapsed = time.perf_counter() - since  # after the sync: the device work is done
        if not math.isfinite(values[0]) and not self.skip_nonfinite:
            self.raise_nonfinite()
        self.finite_until = self.step
        metrics = {"epoch": round(self.step / self.steps_per_epoch, 3), "loss": values[0], **terms,
                   "lr": self.last_lr}
        if grad_norm is not None:
            metrics["grad_norm"] = values[1]
        metrics.update(self.efficiency(steps, elapsed))
        self.data_wait_s = 0.0
        if self.skipped_steps:
            metrics["skipped_steps"] = self.skipped_steps
        self.time_left.mark(self.step)
        self.telemetry.train(self.step, metrics, self.time_left.seconds(self.total_steps))

    def efficiency(self, steps: int, elapsed: float) -> Dict[str, float]:
        """Throughput, step time, the share of time spent waiting for data, peak memory and
        (GPU, GPT-style model) model FLOPs utilisation, over one log interval."""
        rate = self.units_per_step * steps / elapsed
        figures = {f"{self.data.unit}_per_s": rate, "step_ms": 1000 * elapsed / steps,
                   "data_wait": min(1.0, self.data_wait_s / elapsed),
                   "peak_mem_mb": peak_memory_mb(self.device)}
        if self.flops_per_unit and self.peak_flops:
            figures["mfu"] = self.flops_per_unit * rate / (self.peak_flops * self.env.world_size)
        return figures

    def check_finite(self) -> None:
        """Never checkpoint weights that a non-finite step has touched: the losses since the
        last log step and every parameter must be finite (one sync, at saves only)."""
        shards = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]  # FSDP: own shard
        finite = torch.stack([torch.isfinite(self.loss_sum)] + [torch.isfinite(p).all() for p in shards]).all()
        bad = distributed.all_reduce_sum((~finite).to(torch.float32))
        if bad.item() > 0 and not self.skip_nonfinite:
            self.raise_nonfinite()
        self.finite_until = self.step

    def raise_nonfinite(self) -> None:
        kept = self.checkpoints.last_saved_step
        kept = f"the checkpoint of step {kept} is kept" if kept is not None else "no checkpoint was written"
        raise Diverged(f"loss or gradients became non-finite between steps {self.finite_until + 1} and "
                        f"{self.step}; {kept}. Lower optim.lr (now {self.last_lr:.3g}), set trainer.grad_clip, "
                        "or use trainer.on_nonfinite=skip to drop such steps")

    def validate(self) -> Dict[str, float]:
        metrics = self.evaluate("val", self.settings.eval_batches)
        self.telemetry.eval(self.step, "val", metrics)
        if not math.isfinite(metrics["loss"]):  # never checkpoint diverged weights
            raise Diverged(f"validation loss became {metrics['loss']} at step {self.step}; lower "
                            f"optim.lr (now {self.last_lr:.3g}) or set trainer.grad_clip")
        is_best = self.monitor.update(metrics, self.step)
        self.save(is_best)
        return metrics

    def save(self, is_best: bool = False) -> Optional[Path]:
        if not self.checkpoints.enabled:
            return None
        self.check_finite()
        return self.checkpoints.save(self.step, self.checkpoint_record(),
                                     self.state_model if self.sharded else self.raw_model, self.optimizer, is_best)

    @torch.no_grad()
    def evaluate(self, split: str, max_batches: Optional[int] = None) -> Dict[str, float]:
        if self.pipeline is not None:
            return self.pipeline.evaluate(split, max_batches)
        if self.env.is_distributed:
            distributed.sync_buffers(self.raw_model)
        was_training = self.model.training
        self.model.eval()  # (the wrapper and the model share their modules)
        # The unwrapped model: DDP's forward would sync buffers, and ranks may run different
        # numbers of eval batches.
        metrics = evaluate_model(self.raw_model, self.data, self.task, split, self.precision,
                                 self.device, max_batches, self.share, self.dp_group)
        self.model.train(was_training)
        return metrics

    def restore_best(self) -> bool:
        """Load the best checkpoint's weights (for the final test); False if there is none,
        or if it is damaged (it may be from an earlier process of a resumed run)."""
        path = self.checkpoints.best_path()
        checkpoint, problem = None, None
        if self.env.is_main and path.exists():  # rank 0 checks every byte; the others then read it
            try:
                checkpoint = load_checkpoint(path)
            except UserError as err:
                problem = str(err)
        exists, problem = distributed.broadcast_from_main((path.exists(), problem))
        if not exists:
            return False
        if problem:
            log.warning("the final test uses the final weights: %s", problem)
            return False
        load_weights(self.state_model if self.sharded else self.raw_model,
                     checkpoint if checkpoint is not None else load_checkpoint(path, verify=False))
        return True

    # ------------------------------------------------------------------ state
    def checkpoint_record(self) -> CheckpointRecord:
        """Everything the next step depends on besides model and optimizer state (collective:
        every rank calls it)."""
        scheduler = scheduler_state(self.scheduler)
        origin = self.provenance
        return CheckpointRecord(
            step=self.step, epoch=round(self.step / self.steps_per_epoch, 3),
            config=origin.config, choices=origin.choices, data=origin.data, spec=origin.spec,
            best=self.monitor.state_dict(), scheduler=scheduler, scaler=self.scaler.state_dict(),
            rng=distributed.all_gather_objects(capture_rng_state()), world_size=self.env.world_size,
            data_position=self.data_position())

    def load_training_state(self, checkpoint: Checkpoint) -> None:
        """Weights, optimizer, schedule and scaler from a checkpoint."""
        load_model_and_optimizer(self.state_model if checkpoint.is_sharded else self.raw_model, self.optimizer,
                                 checkpoint)
        load_scheduler_state(self.scheduler, checkpoint.scheduler, self.configured_hyperparameters)
        if checkpoint.scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(checkpoint.scaler)

    def load_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Continue from a checkpoint (collective under FSDP)."""
        path = checkpoint.path
        if not checkpoint.is_sharded and self.sharded:
            raise UserError(f"{path} was written by an unsharded run and cannot resume a run that splits the model "
                            f"(trainer.strategy=fsdp, trainer.parallel.tp>1 or trainer.parallel.pp>1); resume with "
                            f"trainer.strategy=ddp trainer.parallel.tp=1 trainer.parallel.pp=1, or start from its "
                            f"weights with trainer.init_from={path}")
        try:
            self.load_training_state(checkpoint)
            self.monitor.load_state_dict(checkpoint.best)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            # Its config matched this run's, so what does not fit is the checkpoint's content.
            raise UserError(f"checkpoint {path} does not fit this run ({type(err).__name__}: {first_line(err)}); "
                            "it is damaged or was edited: use another checkpoint") from None
        reapply_hyperparameters(self.optimizer, self.scheduler, self.configured_hyperparameters)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.step = checkpoint.step
        self.checkpoints.last_saved_step = self.step
        self.finite_until = self.step
        self.resumed_rng = checkpoint.rng[self.env.rank] if len(checkpoint.rng) == self.env.world_size else None
        batches_then = checkpoint.data_position.get("batches_per_epoch")
        sampler_then = checkpoint.data_position.get("sampler", 1)
        if sampler_then != self.data.sampler_version:
            log.warning("the checkpoint's training batches were drawn by sampler version %s, this bigmodel's by "
                        "version %s: training continues, but not bit for bit as an uninterrupted run would",
                        sampler_then, self.data.sampler_version)
        elif self.resumed_rng is None or batches_then != len(self.train_loader):
            log.warning("resuming with %d ranks and %d batches per epoch, the checkpoint had %s ranks and %s: "
                        "training continues, but not bit for bit as an uninterrupted run would",
                        self.env.world_size, len(self.train_loader), checkpoint.world_size, batches_then)


@torch.no_grad()
def evaluate_model(model: nn.Module, data: DataModule, task: Task, split: str, precision: str,
                   device: torch.device, max_batches: Optional[int] = None,
                   share: DataShare = DataShare(), group=None) -> Dict[str, float]:
    """Metrics over a split (or its first `max_batches` batches per replica); one host sync
    at the end. Data-parallel replicas (`share`, reduced over `group`) evaluate disjoint
    shares and sum them, so each sample counts once; a replica's tp ranks run the same batches."""
    loader = data.eval_batches(split, rank=share.rank, world_size=share.world_size)
    count = len(loader) if max_batches is None else min(len(loader), max_batches)
    # With the model split (FSDP, TP) every forward is a collective, so all ranks must run as
    # many; a rank with fewer batches repeats its last one and does not count it.
    forwards = distributed.all_reduce_max(count, device) if distributed.holds_dtensors(model) else count
    sums, batches, batch = None, iter(loader), None
    for i in range(forwards):
        if i < count:
            batch = next(batches)
        x, y = batch
        with autocast(precision, device):
            output = logits_of(model(x))
        if i < count:
            stats = task.batch_sums(output, y)
            sums = stats if sums is None else sums + stats
    if sums is None:
        raise UserError(f"the {split} split is empty")
    return task.finalize(distributed.all_reduce_sum(sums, group))

"""One training step on fake tensors: the memory it would take, without taking it.

The model is built under torch's FakeTensorMode (tensors with shapes, dtypes and a CPU
device but no storage behind them), and then does what the Trainer's step does: forward
under autocast, the task's loss, backward, gradient clipping and the optimizer step. The
fake tensors claim to be on the CPU, so the kernels chosen are the real ones (fused
attention, not the meta device's fallback), and autocast applies. LiveBytes counts what
every op would allocate and free; the peaks come out exact for any model, without a
formula per model family.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from bigmodel_cli.build.parts import count_parameters
from bigmodel_cli.build.planning import build_planned, fake_mode
from bigmodel_cli.data.base import DataSpec
from bigmodel_cli.engine.device import autocast
from bigmodel_cli.engine.distributed import repeated_blocks
from bigmodel_cli.engine.logits import logits_of
from bigmodel_cli.engine.tasks import task_for
from bigmodel_cli.errors import UserError, first_line
from bigmodel_cli.plan.tracker import LiveBytes, storage_key
from bigmodel_cli.telemetry.efficiency import knows_flops_per_token


@dataclass
class StepMemory:
    """Bytes one process would hold in a training step, with nothing sharded."""

    count: int  # parameters (tied weights once)
    model: nn.Module  # the fake model (for the FLOPs estimate; it holds no memory)
    parameters: int  # bytes of the model's weights and buffers
    gradients: int  # one per trainable parameter, in its dtype
    optimizer: int  # the optimizer's state, once created
    pass_peak: Dict[str, int]  # live bytes by kind when forward + backward peaked
    update_peak: Dict[str, int]  # live bytes by kind when the optimizer step peaked
    blocks: Tuple[int, ...] = ()  # parameter bytes of each repeated block (FSDP units)
    flops: Optional[float] = None  # counted FLOPs of forward + backward
    recomputes: bool = False  # activation checkpointing was applied
    weight_bytes: Dict[str, int] = field(default_factory=dict)


def simulate_step(cfg: DictConfig, spec: DataSpec, batch, precision: str, count_flops: bool = True) -> StepMemory:
    """Build the model of `cfg` for `spec` and run one step on `batch` (real tensors of
    one device's micro-batch, copied as fake ones), all on fake tensors. The step's matrix
    ops are counted (count_flops) unless the model's FLOPs per token are known otherwise."""
    with fake_mode() as mode:
        parts = build_planned(cfg, spec)
        model, optimizer, recompute = parts.model, parts.optimizer, parts.recomputes
        count_flops = count_flops and not knows_flops_per_token(model, spec.task)
        x, y = (mode.from_tensor(t) for t in batch)
        tracker = LiveBytes()
        track_model(tracker, model)
        flops = FlopCount() if count_flops else nullcontext()
        with tracker:
            with flops:
                pass_peak = forward_backward(model, task_for(spec.task), x, y, precision, tracker)
            update_peak = optimizer_step(model, optimizer, cfg, tracker)
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        state = state_bytes(optimizer)
        blocks = tuple(module_bytes(b) for b in repeated_blocks(model))
    return StepMemory(count_parameters(model), model, module_bytes(model, buffers=True), grads, state, pass_peak, update_peak, blocks,
                      flops.total if count_flops else None, recompute)


def track_model(tracker: LiveBytes, model: nn.Module) -> None:
    """The weights are there before the step; their gradients are labelled as autograd stores them."""
    params = list(model.parameters())
    for tensor in [*params, *model.buffers()]:
        tracker.add(tensor, "parameters")
    tracker.params = {storage_key(p) for p in params}
    for p in params:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda q: tracker.relabel([q.grad], "gradients"))


def forward_backward(model: nn.Module, task, x, y, precision: str, tracker: LiveBytes) -> Dict[str, int]:

    try:
        with autocast(precision, torch.device("cpu")):
            output = logits_of(model(x))
        loss = task.loss(output, y)
    except Exception as err:  # the model's own code: it cannot read this data (as check_model_fits says)
        raise UserError(f"{type(model).__name__} cannot train on this data: a batch of {tuple(x.shape)} "
                        f"failed with {type(err).__name__}: {first_line(err)}") from None
    del output
    loss.backward()
    del loss
    return dict(tracker.at_peak)


def optimizer_step(model: nn.Module, optimizer, cfg: DictConfig, tracker: LiveBytes) -> Dict[str, int]:
    """Clip (as trainer.grad_clip says) and update; the state it creates is optimizer memory."""
    tracker.peak, tracker.phase = 0, "optimizer"
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.trainer.get("grad_clip") is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.grad_clip)
    optimizer.step()
    tracker.note_peak()
    return dict(tracker.at_peak)


def state_bytes(optimizer) -> int:
    seen: Dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                seen[storage_key(value)] = value.untyped_storage().nbytes()
    return sum(seen.values())


def module_bytes(module: nn.Module, buffers: bool = False) -> int:
    tensors = list(module.parameters()) + (list(module.buffers()) if buffers else [])
    return sum({storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


class FlopCount:
    """torch's FlopCounterMode, quiet: the FLOPs of the matrix ops (forward and backward)."""

    def __enter__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self.mode = FlopCounterMode(display=False)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.total = float(self.mode.get_total_flops())

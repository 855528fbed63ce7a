"""Optimizer parameter groups and LR schedules (stepped once per optimizer step).

A schedule is a small picklable callable, step -> LR multiplier, that the Trainer
wraps in torch's LambdaLR; every one of them can start with a linear warmup.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, List, Optional

import torch
from torch import nn

log = logging.getLogger("bigmodel")


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Decay matrices and embeddings; leave biases and norm weights (1-D tensors) alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], model: nn.Module) -> torch.optim.Optimizer:
    """`factory` is the partial that Hydra instantiates from conf/optim/*.yaml."""
    keywords = getattr(factory, "keywords", {})
    extra = {}
    # On CUDA, one fused kernel for the whole update where the optimizer has one (Adam,
    # AdamW, SGD), unless the config chose otherwise.
    on_cuda = all(p.is_cuda for p in model.parameters())
    if on_cuda and "fused" not in keywords and "foreach" not in keywords and accepts(factory, "fused"):
        extra["fused"] = True
    return factory(param_groups(model, keywords.get("weight_decay", 0.0)), **extra)


def accepts(factory: Callable, name: str) -> bool:
    import inspect

    target = getattr(factory, "func", factory)
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


class Schedule:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then `decay`."""

    def __init__(self, warmup_steps: int = 0, total_steps: Optional[int] = None):
        # (Values are checked with their schema: config.validate_scheduler.)
        self.total_steps = total_steps
        if total_steps is not None and warmup_steps >= total_steps:
            # A warmup as long as the run would never reach optim.lr.
            log.warning("scheduler.warmup_steps=%d >= %d planned steps; warming up for %d steps instead",
                        warmup_steps, self.total_steps, self.total_steps // 10)
            warmup_steps = self.total_steps // 10
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return self.decay(step - self.warmup_steps)

    def decay(self, step: int) -> float:
        raise NotImplementedError


class Constant(Schedule):
    def decay(self, step: int) -> float:
        return 1.0


class StepDecay(Schedule):
    """lr <- lr * gamma every `step_size` steps."""

    def __init__(self, step_size: int = 500, gamma: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.step_size, self.gamma = step_size, gamma

    def decay(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


class Exponential(Schedule):
    """lr <- lr * gamma every step."""

    def __init__(self, gamma: float = 0.999, **kwargs):
        super().__init__(**kwargs)
        self.gamma = gamma

    def decay(self, step: int) -> float:
        return self.gamma ** step


class Cosine(Schedule):
    """Half a cosine from 1 down to `min_lr_ratio` at the last step, then flat."""

    def __init__(self, min_lr_ratio: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.min_lr_ratio = min_lr_ratio

    def decay(self, step: int) -> float:
        if self.total_steps is None:
            raise ValueError("the cosine schedule needs total_steps")
        span = max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(1.0, step / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


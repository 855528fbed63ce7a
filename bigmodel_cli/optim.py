"""Optimizer parameter groups and LR schedules (stepped once per optimizer step).

A schedule is a small picklable callable, step -> LR multiplier, that the Trainer
wraps in torch's LambdaLR; every one of them can start with a linear warmup. A
torch.optim.lr_scheduler class (scheduler._target_=torch.optim.lr_scheduler.<Name>) comes
as a TorchSchedule, built once the optimizer exists, with the same warmup in front.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from bigmodel_cli.errors import UserError

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
        # (Values are checked with their schema: config_checks.validate_scheduler.)
        self.total_steps = total_steps
        self.warmup_steps = fitted_warmup(warmup_steps, total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return warmup_factor(step, self.warmup_steps)
        return self.decay(step - self.warmup_steps)

    def decay(self, step: int) -> float:
        raise NotImplementedError


def fitted_warmup(warmup_steps: int, total_steps: Optional[int]) -> int:
    """The warmup a run of `total_steps` can have: a tenth of it where the one asked for is as
    long as the run (which would then never reach optim.lr)."""
    if total_steps is not None and warmup_steps >= total_steps:
        log.warning("scheduler.warmup_steps=%d >= %d planned steps; warming up for %d steps instead",
                    warmup_steps, total_steps, total_steps // 10)
        return total_steps // 10
    return warmup_steps


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: the LR multiplier at optimizer step `step` < warmup_steps (0-based)."""
    return (step + 1) / (warmup_steps + 1)


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



# ------------------------------------------------------------- torch's LR schedulers


class LinearWarmup:
    """LambdaLR's multiplier for the warmup in front of a torch scheduler (picklable, and
    its state is plain numbers)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return min(1.0, warmup_factor(step, self.warmup_steps))


#: arguments that give a run's length; null (or left out where the class requires them)
#: means the run's optimizer steps after the warmup
RUN_LENGTH_ARGS = ("T_max", "total_iters", "total_steps")
#: keys of bigmodel's own schedule options, passed to a torch class only where it takes them
#: (a node made from scheduler=cosine keeps min_lr_ratio after scheduler._target_=torch...)
BIGMODEL_KEYS = ("warmup_steps", "total_steps", "min_lr_ratio", "step_size", "gamma")


def is_torch_scheduler(target: Any) -> bool:
    return isinstance(target, type) and issubclass(target, torch.optim.lr_scheduler.LRScheduler)


class TorchSchedule:
    """A torch.optim.lr_scheduler class and its keyword arguments from the scheduler config
    node, stepped once per optimizer step; bigmodel's linear warmup_steps come first."""

    def __init__(self, cls: type, node: Dict[str, Any], total_steps: int):
        self.cls, self.name = cls, f"{cls.__module__}.{cls.__qualname__}"
        self.warmup_steps = fitted_warmup(int(node.get("warmup_steps") or 0), total_steps)
        self.run_length = max(1, total_steps - self.warmup_steps)
        self.kwargs = self.arguments(node, self.run_length)
        self.check_one_cycle_length()

    def arguments(self, node: Dict[str, Any], run_length: int) -> Dict[str, Any]:
        params = inspect.signature(self.cls).parameters
        kwargs = {k: v for k, v in node.items() if not k.startswith("_")
                  and (k not in BIGMODEL_KEYS or (k in params and v is not None))}
        left_out = sorted(k for k in node if k in BIGMODEL_KEYS and k not in kwargs and k != "warmup_steps")
        if left_out:
            log.info("scheduler: %s does not take %s; left out", self.name, ", ".join(left_out))
        for name in RUN_LENGTH_ARGS:
            required = name in params and params[name].default in (inspect.Parameter.empty, None)
            if name in params and (kwargs.get(name, ...) is None or (required and name not in kwargs)):
                kwargs[name] = max(1, run_length)
        return kwargs

    def check_one_cycle_length(self) -> None:
        """OneCycleLR raises once stepped past its total_steps: refuse a run longer than that."""
        given = self.kwargs.get("total_steps")
        if issubclass(self.cls, torch.optim.lr_scheduler.OneCycleLR) and given is not None \
                and given < self.run_length:
            raise UserError(f"scheduler.total_steps={given} is shorter than this run's {self.run_length} steps "
                            f"after warmup, and {self.name} cannot step past it; leave scheduler.total_steps "
                            "out (bigmodel fills in the run's length) or raise it")

    def build(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(self.warmup_steps)) \
            if self.warmup_steps else None
        try:
            main = self.cls(optimizer, **self.kwargs)
        except TypeError as err:
            takes = [p for p in inspect.signature(self.cls).parameters if p not in ("optimizer", "self")]
            raise UserError(f"scheduler._target_={self.name} cannot be built ({str(err).splitlines()[0]}); "
                            f"it takes {', '.join(takes)}: give them as +scheduler.<name>=<value> and "
                            "drop the others") from None
        except ValueError as err:
            raise UserError(f"scheduler._target_={self.name} refused its arguments ({str(err).splitlines()[0]}); "
                            "fix the scheduler.<name> it names") from None
        if warmup is None:
            return main
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[self.warmup_steps])


def lr_scheduler(optimizer: torch.optim.Optimizer,
                 schedule: Union[Callable[[int], float], TorchSchedule]) -> torch.optim.lr_scheduler.LRScheduler:
    """The torch scheduler the Trainer steps: LambdaLR over one of bigmodel's schedules, or
    the one a TorchSchedule builds."""
    if isinstance(schedule, TorchSchedule):
        return schedule.build(optimizer)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def scheduler_kind(scheduler: torch.optim.lr_scheduler.LRScheduler) -> str:
    """LambdaLR (any of bigmodel's schedules), a torch class, or SequentialLR(LambdaLR, <class>)."""
    inner = getattr(scheduler, "_schedulers", None)
    name = type(scheduler).__name__
    return f"{name}({', '.join(type(s).__name__ for s in inner)})" if inner else name


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> Dict[str, Any]:
    """What a checkpoint keeps of the scheduler: its state and kind, less bigmodel's
    multiplier functions (the schedule comes from the config on resume)."""
    state = scheduler.state_dict()
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        state.pop("lr_lambdas", None)
    return {**state, "kind": scheduler_kind(scheduler)}


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler, state: Dict[str, Any],
                         fresh_groups: Optional[List[Dict[str, Any]]] = None) -> None:
    """The inverse of scheduler_state; a checkpoint of another kind of scheduler is refused
    (one written before torch schedulers were supported is LambdaLR), and so is a torch
    scheduler built with other arguments (`fresh_groups`: this run's param-group settings,
    compared with the loaded optimizer's)."""
    state = dict(state)
    saved, kind = state.pop("kind", "LambdaLR"), scheduler_kind(scheduler)
    if saved != kind:
        raise UserError(f"cannot resume: the checkpoint's LR scheduler is {saved}, this run's {kind} (a changed "
                        "scheduler._target_ or, for a torch scheduler, scheduler.warmup_steps, or a trainer.max_steps that "
                        "changes the warmup cut to fit the run); resume with the "
                        "checkpoint's scheduler settings, or start from its weights with trainer.init_from")
    refuse_changed_torch_scheduler(scheduler, state, fresh_groups or [])
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(state)


# A torch scheduler continues from its saved state: the arguments it was built with (T_max,
# total_steps, eta_min, ...) come back with it. bigmodel's own schedules are rebuilt from the
# config and follow a changed run length; a torch one built differently is refused instead
# of silently running the checkpoint's schedule (or OneCycleLR failing past its end).

#: values a torch scheduler writes into the optimizer's param groups once, at construction
GROUP_CONSTANTS = ("max_lr", "min_lr", "max_momentum", "base_momentum", "initial_lr")


def refuse_changed_torch_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, state: Dict[str, Any],
                                   fresh_groups: List[Dict[str, Any]]) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return  # bigmodel's schedule: rebuilt from this run's config
    changes = changed_arguments(scheduler, state) or changed_group_constants(scheduler.optimizer, fresh_groups)
    if changes:
        shown = ", ".join(f"{name}={old!r} there, {new!r} here" for name, old, new in changes)
        raise UserError(f"cannot resume: this run's torch LR scheduler is built differently from the checkpoint's "
                        f"({shown}), and it would continue with the checkpoint's; resume with the checkpoint's "
                        "trainer.max_steps (T_max, total_iters and total_steps follow it), optim.lr and scheduler.* "
                        "settings, or use one of bigmodel's schedules (e.g. scheduler=cosine), which follow a "
                        "changed run length, or start from its weights with trainer.init_from")


def changed_group_constants(optimizer: torch.optim.Optimizer, fresh_groups: List[Dict[str, Any]]) -> List[tuple]:
    """max_lr and the like live in the param groups, loaded with the optimizer's state."""
    changes: Dict[str, tuple] = {}
    for fresh, loaded in zip(fresh_groups, optimizer.param_groups):
        for k in GROUP_CONSTANTS:
            if k in fresh and k in loaded and not same(fresh[k], loaded[k]):
                changes.setdefault(k, (k, loaded[k], fresh[k]))
    return list(changes.values())


def changed_arguments(scheduler: torch.optim.lr_scheduler.LRScheduler,
                      state: Dict[str, Any]) -> List[tuple]:
    """(name, checkpoint's value, this run's) for each constructor argument of the torch class
    (after any warmup) that its state records under the same name, and for the warmup."""
    fresh = scheduler.state_dict()
    changes = []
    if isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR):
        if not same(fresh["_milestones"], state.get("_milestones")):
            changes.append(("warmup_steps", state.get("_milestones"), fresh["_milestones"]))
        scheduler, fresh = scheduler._schedulers[-1], fresh["_schedulers"][-1]
        state = (state.get("_schedulers") or [{}])[-1]
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return changes
    params = inspect.signature(type(scheduler)).parameters
    return changes + [(name, state[name], fresh[name]) for name in params
                      if name != "last_epoch" and name in fresh and name in state
                      and not same(fresh[name], state[name])]


def same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # e.g. tensors: not something a config sets
        return True

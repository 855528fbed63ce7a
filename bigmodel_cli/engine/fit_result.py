"""How a fit, and a launched worker, ended: typed values instead of dicts with magic keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Optional


class StopCause(str, Enum):
    SIGTERM = "SIGTERM"  # a scheduler's time limit or preemption, or `kill`
    SIGINT = "SIGINT"  # Ctrl-C
    SIGUSR1 = "SIGUSR1"  # Slurm's warning before the time limit (#SBATCH --signal=USR1@90)
    SIGUSR2 = "SIGUSR2"  # the same from a submitit job (hydra/launcher=slurm: --signal=USR2@120)
    OTHER_RANK = "a signal to another rank"  # this rank stopped because the others agreed to

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, signal_name: Optional[str]) -> "StopCause":
        return cls(signal_name) if signal_name in cls._value2member_map_ else cls.OTHER_RANK


class StopAction(str, Enum):
    STOP = "stopped"  # checkpoint written (where enabled); continue with trainer.resume=auto
    STOP_AT_START = "stopped before the first step"  # the signal came while the run was set up
    REQUEUE = "requeued the Slurm job"  # checkpoint written; the command asks Slurm to requeue the job

    def __str__(self) -> str:
        return self.value


@dataclass
class Stopped:
    """A fit that a signal ended early."""

    cause: StopCause
    action: StopAction
    step: int
    checkpoint: Optional[Path]  # what the stop wrote (None: nothing new)


@dataclass
class FitResult:
    steps: int
    epochs: float
    val: Dict[str, float]  # the last validation's metrics
    best: Dict[str, Any]  # the monitor: {"metric", "value", "step"}
    skipped_steps: int = 0
    stopped: Optional[Stopped] = None
    early_stop: Optional[str] = None  # why trainer.early_stopping ended the run (it finished)


@dataclass
class WorkerResult:
    """What a launched worker hands back to its launcher: the summary, or why there is none."""

    summary: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None  # a user error: the launcher reports it once
    diverged: bool = False  # that error is a non-finite loss (errors.Diverged)
    stopped: Optional[str] = None  # the stop line, for the launcher to print
    began: bool = False  # training had begun (its run dir is no failed start to clear away)

"""Requests to stop or checkpoint that arrive from outside the loop, as signals.

- SIGTERM or SIGINT (a scheduler's time limit, preemption, Ctrl-C): finish the current
  step, write a checkpoint, stop (one that arrives while the run is being set up stops
  it before its first step). A second SIGINT or SIGTERM more than a moment later
  stops at once.
- SIGUSR1 (`#SBATCH --signal=USR1@90`): write a checkpoint; inside a Slurm job also
  requeue it and stop, so the requeued job continues from that checkpoint.

Handlers only record the request; the loop acts on it between steps. Under several
processes the ranks must act on the same step, so requests travel through a small
all-reduce on a separate gloo group, started each step and read one step later: every
rank reads the same agreed value and the accelerator stream is never waited on.
"""

from __future__ import annotations

import logging
import shlex
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Dict, Optional

import torch
import torch.distributed as dist

from bigmodel_cli.errors import UserError

log = logging.getLogger("bigmodel")

# Ordered: when ranks disagree, the stronger request wins. SAVE: a timed checkpoint, then
# training goes on; CHECKPOINT (SIGUSR1): a checkpoint, then requeue inside a Slurm job.
NOTHING, SAVE, CHECKPOINT, STOP = 0, 1, 2, 3
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# The same signal often arrives twice in quick succession (Ctrl-C reaches the launcher
# and its workers, and the launcher passes it on); only a later one means "now".
REPEAT_GRACE_S = 2.0


class StopSignals:
    """Records stop/checkpoint signals for the training loop to act on."""

    def __init__(self) -> None:
        self.request = NOTHING
        self.signal_name: Optional[str] = None
        self._stop_since = 0.0
        self._previous: Dict[int, object] = {}

    @contextmanager
    def installed(self):
        """Handle the signals (main thread only) for the duration of the block."""
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        wanted = CHECKPOINT if signum == signal.SIGUSR1 else STOP
        if wanted == STOP and self.request == STOP:
            if time.monotonic() - self._stop_since > REPEAT_GRACE_S:
                raise KeyboardInterrupt  # asked again: do not wait for the checkpoint
            return
        if wanted > self.request:
            self.request, self.signal_name = wanted, name
            if wanted == STOP:
                self._stop_since = time.monotonic()

    def take(self) -> int:
        """The pending request; a checkpoint request is consumed by reading it."""
        request = self.request
        if request == CHECKPOINT:
            self.request = NOTHING
        return request


#: The process's one recorder.
SIGNALS = StopSignals()


class StopAgreement:
    """Makes all ranks act on the same step (a no-op in a single process)."""

    def __init__(self, distributed: bool, timeout_s: float = 300.0):
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if distributed else None
        self.pending = None

    def _all_reduce_max(self, local: int, async_op: bool):
        flag = torch.tensor([local], dtype=torch.int32)  # on the CPU: no accelerator sync
        return dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=async_op), flag

    def now(self, local: int) -> int:
        """The strongest request of all ranks, agreed at once (a blocking collective)."""
        if self.group is None:
            return local
        return int(self._all_reduce_max(local, async_op=False)[1].item())

    def poll(self, local: int) -> int:
        """Send this rank's request; return the agreed one from the previous call."""
        if self.group is None:
            return local
        agreed = NOTHING
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            agreed = int(flag.item())
        self.pending = self._all_reduce_max(local, async_op=True)
        return agreed

    def close(self) -> None:
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


def requeue(command_template: str, job_id: str) -> None:
    """Ask Slurm to requeue this job (it then ends this run and starts the job again)."""
    try:
        command = shlex.split(command_template.format(job_id=job_id))
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"trainer.requeue_command={command_template!r} is malformed ({err}); "
                        "use e.g. 'scontrol requeue {job_id}'") from None
    log.info("requeueing Slurm job %s: %s", job_id, shlex.join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"could not requeue the job ({shlex.join(command)}: {err}); the checkpoint is "
                        "written, so resubmit the job with trainer.resume=auto") from None
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise UserError(f"could not requeue the job ({shlex.join(command)}: {reason[0]}); the checkpoint "
                        "is written, so resubmit the job with trainer.resume=auto")

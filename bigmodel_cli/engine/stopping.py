"""Acting on stop requests (bigmodel_cli/signals.py records them) on the same step on
every rank, and the Slurm requeue.

Under several processes the ranks must act on the same step, so requests travel through a small
all-reduce on a separate gloo group, started each step and read one step later: every
rank reads the same agreed value and the accelerator stream is never waited on.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist

from bigmodel_cli.errors import UserError
from bigmodel_cli.signals import (CHECKPOINT, HANDLED, NOTHING, REPEAT_GRACE_S, SAVE, SIGNALS,  # noqa: F401
                                  STOP, StopSignals)

log = logging.getLogger("bigmodel")


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
    except (KeyError, IndexError, ValueError, AttributeError) as err:
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

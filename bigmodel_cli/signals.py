"""Requests to stop or checkpoint that arrive from outside the loop, as signals.

- SIGTERM or SIGINT (a scheduler's time limit, preemption, Ctrl-C): finish the current
  step, write a checkpoint, stop (one that arrives while the run is being set up stops
  it before its first step). A second SIGINT or SIGTERM more than a moment later
  stops at once.
- SIGUSR1 (`#SBATCH --signal=USR1@90`) or SIGUSR2 (what submitit's jobs get, e.g. under
  hydra/launcher=slurm: `--signal=USR2@120`): write a checkpoint; inside a Slurm job also
  requeue it and stop, so the requeued job continues from that checkpoint.

Handlers only record the request; the training loop acts on it between steps
(engine/stopping.py makes all ranks agree on the step). No torch here: `bigmodel train`
installs the handlers before anything heavy is imported, so a signal during set-up is
never lost.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Dict, Optional

# Ordered: when ranks disagree, the stronger request wins. SAVE: a timed checkpoint, then
# training goes on; CHECKPOINT (SIGUSR1/2): a checkpoint, then requeue inside a Slurm job.
NOTHING, SAVE, CHECKPOINT, STOP = 0, 1, 2, 3
#: "checkpoint, then requeue": Slurm's warning before the time limit, as sbatch scripts
#: (USR1) and submitit (USR2, which would otherwise requeue without a checkpoint) ask for it
CHECKPOINT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
HANDLED = (signal.SIGTERM, signal.SIGINT, *CHECKPOINT_SIGNALS)
# The same signal often arrives twice in quick succession (Ctrl-C reaches the launcher
# and its workers, and the launcher passes it on); only a later one means "now".
REPEAT_GRACE_S = 2.0


class StopSignals:
    """Records stop/checkpoint signals for the training loop to act on."""

    def __init__(self) -> None:
        self.request = NOTHING
        self.signal_name: Optional[str] = None
        self._stop_since = 0.0

    @contextmanager
    def installed(self):
        """Handle the signals (main thread only) for the duration of the block; blocks nest."""
        previous: Dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        wanted = CHECKPOINT if signum in CHECKPOINT_SIGNALS else STOP
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

"""How long a run has left, from the pace of its last few log intervals.

Measured on the wall clock between log lines (evaluations and checkpoints included), over
a moving window, so the estimate follows a shared machine whose load changes during the
run instead of holding on to the pace of the first few steps.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Deque, Optional, Tuple


class TimeLeft:
    def __init__(self, window: int = 5) -> None:
        self.marks: Deque[Tuple[int, float]] = deque(maxlen=window + 1)

    def mark(self, step: int, now: Optional[float] = None) -> None:
        """Record that `step` is done (at each log line; the first after the warm-up step)."""
        self.marks.append((step, time.perf_counter() if now is None else now))

    def seconds(self, total_steps: int) -> Optional[float]:
        """Seconds to step `total_steps` at the recent pace; None until two marks exist."""
        if len(self.marks) < 2:
            return None
        (first_step, first_time), (last_step, last_time) = self.marks[0], self.marks[-1]
        if last_step <= first_step or last_time <= first_time:
            return None
        pace = (last_time - first_time) / (last_step - first_step)
        return max(0, total_steps - last_step) * pace


def human_duration(seconds: float) -> str:
    """45s, 4m12s, 3h05m."""
    if seconds < 60:
        return f"{int(seconds)}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"

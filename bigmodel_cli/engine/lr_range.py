"""The LR range test's arithmetic (Leslie Smith's test, as Lightning's and fastai's tuners
run it): a geometric lr ramp, the smoothed loss with its stop rule, and the suggestion.

No torch here: `bigmodel lr-find` (commands/lr_find.py) feeds it one loss per step, and
the unit tests feed it synthetic curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

#: Leading points the suggestion never picks: the bias-corrected average of the first few
#: losses is still mostly noise, and its first slope often the steepest by accident.
SKIP_START = 5


class ExponentialRamp:
    """LR multiplier for step `step`: 1 at step 0 up to `ratio` at the last of `total_steps`
    steps, geometrically. Given as the run's scheduler (scheduler._target_), with optim.lr
    set to the ramp's first lr, so the Trainer's own LambdaLR steps it."""

    def __init__(self, ratio: float, total_steps: int):
        self.ratio, self.total_steps = ratio, total_steps

    def __call__(self, step: int) -> float:
        return self.ratio ** (min(step, self.total_steps - 1) / max(1, self.total_steps - 1))


def ramp_lrs(min_lr: float, max_lr: float, num_steps: int) -> List[float]:
    """The lr of each step of the test (the multipliers above times min_lr)."""
    ramp = ExponentialRamp(max_lr / min_lr, num_steps)
    return [min_lr * ramp(step) for step in range(num_steps)]


@dataclass
class RangeTest:
    """The losses seen so far, their smoothed curve, and whether to stop.

    Smoothing is an exponential moving average with bias correction (avg / (1 - beta^n)),
    so the first points are not pulled towards 0. The test stops at the first non-finite
    loss, or once the smoothed loss exceeds `diverge_factor` times its lowest value: from
    there on higher lrs only diverge further, and the steps would be wasted."""

    beta: float = 0.98
    diverge_factor: float = 4.0
    lrs: List[float] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    smoothed: List[float] = field(default_factory=list)
    stop_reason: Optional[str] = None
    _average: float = 0.0

    def add(self, lr: float, loss: float) -> bool:
        """Record one step's lr and loss; True when the test should stop here."""
        if not math.isfinite(loss):
            self.stop_reason = f"the loss became {loss} at lr {lr:.3g}"
            return True
        self._average = self.beta * self._average + (1 - self.beta) * loss
        smooth = self._average / (1 - self.beta ** (len(self.losses) + 1))
        best = min(self.smoothed, default=smooth)
        self.lrs.append(lr)
        self.losses.append(loss)
        self.smoothed.append(smooth)
        if len(self.smoothed) > 1 and smooth > self.diverge_factor * best:
            self.stop_reason = (f"the smoothed loss {smooth:.4g} exceeded {self.diverge_factor:g}x its "
                                f"lowest ({best:.4g}) at lr {lr:.3g}")
            return True
        return False


@dataclass
class Suggestion:
    lr: float
    index: int  # the point of the curve it was read from
    min_loss_lr: float  # the lr where the smoothed loss was lowest


def suggest(lrs: Sequence[float], smoothed: Sequence[float], skip_start: int = SKIP_START) -> Optional[Suggestion]:
    """The lr where the smoothed loss falls fastest per decade of lr (the most negative
    slope against log lr), looked for between the first points and the lowest point of the
    curve; None when the curve has no descent to read (too few points, or never falling).

    Why this rule: it picks an lr where training is still clearly making progress, below
    the minimum of the curve, where the loss is about to turn up because the lr is already
    too high for the noise of one batch; the minimum's lr itself trains unstably.
    Searching only up to the minimum keeps the steep climb after it (divergence) from
    counting, and only descents count (a slope < 0)."""
    if len(smoothed) < 3:
        return None
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    start = min(skip_start, max(0, lowest - 2))
    slopes = log_slopes(lrs, smoothed)
    candidates = [i for i in range(start, lowest + 1) if slopes[i] < 0]
    if not candidates:
        return None
    steepest = min(candidates, key=slopes.__getitem__)
    return Suggestion(lrs[steepest], steepest, lrs[lowest])


def log_slopes(lrs: Sequence[float], values: Sequence[float]) -> List[float]:
    """d value / d log10(lr) at each point: central differences inside, one-sided at the
    ends (as numpy.gradient does with uneven spacing left aside: the ramp is even in log lr)."""
    x = [math.log10(lr) for lr in lrs]
    n = len(values)
    out = []
    for i in range(n):
        lo, hi = max(0, i - 1), min(n - 1, i + 1)
        out.append((values[hi] - values[lo]) / (x[hi] - x[lo]))
    return out


def as_override(lr: float) -> str:
    """`optim.lr=3.2e-3`: two significant digits, the exponent without padding."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"optim.lr={mantissa}e{int(exponent)}"

"""User-facing errors: one line naming the problem and the fix, no traceback."""

from __future__ import annotations

import os
from typing import Callable

EXIT_FAILED = 1  # not the user's doing: a full disk, a bug
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early on request, checkpoint written, run it again to resume

#: How a command ended, as `record(status, reason)` hears it (bigmodel_cli/run_outcome.py).
Record = Callable[[str, str], None]


class UserError(Exception):
    """A problem the user can fix (bad value, missing file, incompatible choices)."""


class Diverged(UserError):
    """The loss or the gradients became non-finite: a sweep lists such a job as diverged."""


class TrainingStopped(Exception):
    """Training stopped on request (a signal) after writing a checkpoint; ends a sweep too."""


def first_line(err: BaseException) -> str:
    """An exception's first line of text, cut to a length a one-line error can hold."""
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]


def root_cause(err: BaseException) -> str:
    """'Type: first line' of the innermost exception that caused `err` (a lazy import that
    failed says why only in its cause: a broken dependency of transformers, say)."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return f"{type(err).__name__}: {first_line(err)}"


def debug_requested() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HYDRA_FULL_ERROR", "BIGMODEL_DEBUG"))

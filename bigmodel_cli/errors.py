"""User-facing errors: one line naming the problem and the fix, no traceback."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, List, Optional, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early on request, checkpoint written, run it again to resume

#: "overrides: message" of each multirun job that failed in this process
FAILED_JOBS: List[str] = []


class UserError(Exception):
    """A problem the user can fix (bad value, missing file, incompatible choices)."""


class TrainingStopped(Exception):
    """Training stopped on request (a signal) after writing a checkpoint; ends a sweep too."""


def debug_requested() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HYDRA_FULL_ERROR", "BIGMODEL_DEBUG"))


def report_user_errors(fn: Callable[[], T], keep_going: bool = False, job: str = "") -> Optional[T]:
    """Run a command body; turn a UserError into one line on stderr and exit code 2.

    With `keep_going` (a multirun job) the error is recorded in FAILED_JOBS and None is
    returned instead, so the rest of the sweep still runs. With HYDRA_FULL_ERROR=1 or
    BIGMODEL_DEBUG=1 the exception propagates with its traceback instead.
    """
    try:
        return fn()
    except UserError as err:
        if debug_requested():
            raise
        # Also into the run's log file, so a failed cluster job explains itself.
        logging.getLogger("bigmodel").debug("error: %s", err)
        for handler in logging.getLogger().handlers:
            handler.flush()
        print(f"error: {err}", file=sys.stderr, flush=True)
        if keep_going:
            FAILED_JOBS.append(f"{job or '(no overrides)'}: {err}")
            return None
        sys.exit(EXIT_USER_ERROR)
    except TrainingStopped as stop:
        logging.getLogger("bigmodel").debug("stopped: %s", stop)
        for handler in logging.getLogger().handlers:
            handler.flush()
        print(f"stopped: {stop}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:
        if debug_requested():
            raise
        print("interrupted: stopped by Ctrl-C; checkpoints already written are intact",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)

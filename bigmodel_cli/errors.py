"""User-facing errors: one line naming the problem and the fix, no traceback."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

EXIT_FAILED = 1  # not the user's doing: a full disk, a bug
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early on request, checkpoint written, run it again to resume

#: How a command ended, as `record(status, reason)` hears it (bigmodel_cli/outcome.py).
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


def report_user_errors(fn: Callable[[], T], keep_going: bool = False, run_dir: Optional[Path] = None,
                       record: Optional[Record] = None) -> Optional[T]:
    """Run a command body; turn what goes wrong into one line on stderr and an exit code:
    2 for a UserError, 75 for a stop on request, 130 for Ctrl-C, 1 for anything else (a
    full disk, a bug: the traceback goes to the run's log file).

    A UserError also removes `run_dir` if this start made it and it holds no result yet
    (bigmodel_cli/failed_start.py), except in a sweep (`keep_going`), whose summary lists
    the job. `record` hears how it ended (failed, diverged, stopped) with the one line.
    With `keep_going` (a multirun job) None is returned instead of exiting, so the rest of
    the sweep still runs. With HYDRA_FULL_ERROR=1 or BIGMODEL_DEBUG=1 the exception
    propagates with its traceback instead.
    """
    record = record or (lambda status, reason: None)
    try:
        return fn()
    except TrainingStopped as stop:
        _note("stopped", str(stop))
        record("stopped", str(stop))
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:
        if debug_requested():
            raise
        _note("interrupted", "stopped by Ctrl-C; checkpoints already written are intact")
        record("stopped", "stopped by Ctrl-C")
        sys.exit(EXIT_INTERRUPTED)
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # Exception, and what libraries raise outside it (a Rust panic)
        if debug_requested():
            raise
        user = isinstance(err, UserError)
        message = str(err) if user else describe_unexpected(err)
        if user and run_dir is not None and not keep_going:
            from bigmodel_cli.failed_start import discard_failed_start

            discard_failed_start(run_dir)
        if not user:  # the traceback, for a bug report, into the log file only
            logging.getLogger("bigmodel").debug("unexpected error", exc_info=True)
        _note("error", message)
        record("diverged" if isinstance(err, Diverged) else "failed", message)
        if keep_going:
            return None
        sys.exit(EXIT_USER_ERROR if user else EXIT_FAILED)


def _note(kind: str, message: str) -> None:
    """The one line on the console, and the same into the run's log file."""
    logging.getLogger("bigmodel").debug("%s: %s", kind, message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(f"{kind}: {message}", file=sys.stderr, flush=True)


def describe_unexpected(err: BaseException) -> str:
    """One line for an error that is not a UserError: the machine's (a full or read-only
    disk, no memory) in plain words, anything else as an internal error."""
    if isinstance(err, OSError) and err.strerror:
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror}{where}{free_space_note(err)}"
    if isinstance(err, MemoryError):
        return "out of memory; use a smaller model, data.batch_size or data set"
    log_file = next((h.baseFilename for h in logging.getLogger().handlers
                     if isinstance(h, logging.FileHandler)), None)
    where = f"the traceback is in {log_file}; " if log_file else ""
    return (f"unexpected {type(err).__name__}: {first_line(err)} ({where}BIGMODEL_DEBUG=1 shows it here; "
            "if bigmodel's own code is at fault, please report it)")


def free_space_note(err: OSError) -> str:
    if err.errno not in (errno.ENOSPC, errno.EDQUOT) or not err.filename:
        return ""
    from pathlib import Path

    from bigmodel_cli.engine.files import describe_free_space

    return f"; {describe_free_space(Path(os.fsdecode(err.filename)).parent)}"

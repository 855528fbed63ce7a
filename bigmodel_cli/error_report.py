"""How a command's failure reaches the user: one line on stderr naming the problem (and the
same into the run's log), an exit code, and a failed start's run dir removed."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

from bigmodel_cli.engine.files import describe_free_space
from bigmodel_cli.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_STOPPED, EXIT_USER_ERROR, Diverged, Record,
                                 TrainingStopped, UserError, debug_requested, first_line)
from bigmodel_cli.failed_start import discard_failed_start

T = TypeVar("T")


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
    return f"; {describe_free_space(Path(os.fsdecode(err.filename)).parent)}"

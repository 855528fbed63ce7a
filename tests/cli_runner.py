"""`bigmodel ARGS` inside the test process, through the console script's entry point.

A command changes process-wide state as it runs: the working directory, os.environ,
sys.argv, sys.path, the root logger's handlers, torch's thread count and numerics flags,
signal handlers, Hydra's singletons and a few module-level records. `invoke` gives the
command its own copy of each and puts the test process's back afterwards, so that tests
stay independent of each other and of the order they run in.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import List, Tuple

import torch
from hydra.core.global_hydra import GlobalHydra

from bigmodel_cli import cli
from bigmodel_cli.signals import HANDLED, NOTHING, SIGNALS


class Captured(io.StringIO):
    """A console that is not a terminal (as a pipe is for a subprocess)."""

    def isatty(self) -> bool:
        return False


def invoke(argv: List[str], cwd: Path, env: dict) -> Tuple[int, str, str]:
    """Run `bigmodel *argv` in `cwd` with exactly `env`: (exit code, stdout, stderr)."""
    out, err = Captured(), Captured()
    with process_state_kept(), working_in(cwd, env), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        code = exit_code_of(argv)
    return code, out.getvalue(), err.getvalue()


def exit_code_of(argv: List[str]) -> int:
    """What the process would exit with; an uncaught exception prints its traceback, as
    Python does, and gives 1."""
    try:
        return cli.main(argv) or 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - the interpreter's own behaviour for an uncaught error
        traceback.print_exc()
        return 1


@contextlib.contextmanager
def working_in(cwd: Path, env: dict):
    """cwd and os.environ as a fresh process started there with `env` would have them."""
    here, environ = os.getcwd(), dict(os.environ)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)


@contextlib.contextmanager
def process_state_kept():
    argv, path, modules = list(sys.argv), list(sys.path), set(sys.modules)
    handlers = {sig: signal.getsignal(sig) for sig in HANDLED}
    loggers = logging_state()
    numerics = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.get_float32_matmul_precision(), torch.get_default_dtype())
    fresh_module_records()
    GlobalHydra.instance().clear()
    try:
        with warnings.catch_warnings():
            yield
    finally:
        GlobalHydra.instance().clear()
        fresh_module_records()
        restore_logging(loggers)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        threads, deterministic, matmul, dtype = numerics
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_float32_matmul_precision(matmul)
        torch.set_default_dtype(dtype)
        sys.argv[:], sys.path[:] = argv, path
        forget_user_modules(modules)
        stop_reusable_workers()


def fresh_module_records() -> None:
    """The records a command keeps at module level, as a new process starts them."""
    SIGNALS.request, SIGNALS.signal_name = NOTHING, None
    from bigmodel_cli import sweep_summary
    from bigmodel_cli.plan import gpus

    sweep_summary.LAST_SWEEP_FAILED.clear()
    gpus.REQUESTED = None


def stop_reusable_workers() -> None:
    """joblib's launcher leaves its loky worker processes alive for reuse; a process that
    ends takes them along, so here they go too, inside the test that started them (their CPU
    time would otherwise be charged to whichever later test reaps them)."""
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


def forget_user_modules(before: set) -> None:
    """A user's own modules (mypkg.nets in a test's cwd) imported by this command: the next
    test's cwd may hold a different mypkg under the same name."""
    for name in set(sys.modules) - before:
        origin = module_location(sys.modules.get(name))
        if origin and "site-packages" not in origin and "bigmodel_cli" not in origin \
                and not origin.startswith(sys.prefix) and not origin.startswith(sys.base_prefix):
            del sys.modules[name]
    importlib.invalidate_caches()


def module_location(module) -> str:
    """Where a module was read from; a namespace package (mypkg/ with no __init__.py) has no
    __file__, only the folders on its __path__."""
    origin = getattr(module, "__file__", None)
    if origin:
        return origin
    folders = list(getattr(module, "__path__", None) or [])
    return str(folders[0]) if folders else ""


def logging_state():
    manager = logging.Logger.manager
    every = [logging.getLogger()] + [lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return (logging.raiseExceptions, logging.root.manager.disable,
            {lg: (lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in every})


def restore_logging(state) -> None:
    """Close the handlers a command added (its log files) and give each logger its old ones.
    A logger first made during the command keeps what its library gave it (a NullHandler, no
    propagation: torch's event loggers), less any other handler."""
    raise_exceptions, disabled_below, loggers = state
    manager = logging.Logger.manager
    every = [logging.getLogger()] + [lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for logger in every:
        new = [h for h in logger.handlers if isinstance(h, logging.NullHandler)]
        level, handlers, propagate, disabled = loggers.get(logger, (logger.level, new, logger.propagate, False))
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled
    logging.raiseExceptions = raise_exceptions
    logging.disable(disabled_below)

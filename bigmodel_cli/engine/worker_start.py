"""How launched workers start: forked from one server process that has imported torch and
bigmodel once, instead of each worker starting Python afresh.

A fresh interpreter pays several seconds of CPU before its first step (torch, torch._dynamo,
which the optimizers import, torch.distributed, bigmodel's own modules). Python's forkserver
start method pays that once per launching process: the server imports PRELOAD, and every
worker of every launch from this process (each job of a sweep) is a fork of it. The server
imports but never computes, so no thread pool or CUDA context exists when it forks.

What a fork would otherwise get wrong: the server's environment is the one of the moment it
started. Each worker therefore takes this process's environment of the moment it launches,
plus what the elastic launcher set for that worker (RANK, MASTER_PORT, ...). The working
directory, sys.path and sys.argv travel with every start already (multiprocessing's own
preparation data).
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing import forkserver
from typing import Any, Callable, Dict, Tuple

START_METHOD = "forkserver"

# What a worker imports before its first step (an import that fails is skipped by the server).
PRELOAD = [
    "torch",
    "torch._dynamo",  # torch.optim imports it on first use: the largest single import
    "torch.distributed.fsdp",
    "torch.distributed.tensor.parallel",
    "torch.distributed.pipelining",
    "bigmodel_cli.commands.train",
    "bigmodel_cli.run",
    "bigmodel_cli.engine.distributed",
]

# The environment the running server started with, {} before it starts.
_server_env: Dict[str, str] = {}
_server_pid = None


def server_environment() -> Dict[str, str]:
    """Start the server if it is not running (again, if it died), and return the
    environment it started with."""
    global _server_env, _server_pid
    multiprocessing.get_context(START_METHOD).set_forkserver_preload(PRELOAD)
    environ = dict(os.environ)
    forkserver.ensure_running()
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid != _server_pid or not _server_env:  # (re)started by the call above
        _server_pid, _server_env = pid, environ
    return _server_env


def in_launch_environment(launch_env: Dict[str, str], server_env: Dict[str, str],
                          worker: Callable[..., Any], *args: Any) -> Any:
    """Run in the worker: the launching process's environment at launch, plus each variable
    the elastic launcher set for this worker (those that differ from the server's start)."""
    set_for_worker = {key: value for key, value in os.environ.items() if server_env.get(key) != value}
    os.environ.clear()
    os.environ.update(launch_env)
    os.environ.update(set_for_worker)
    return worker(*args)


def worker_call(worker: Callable[..., Any], args: Tuple[Any, ...]) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
    """The function and arguments to hand the elastic launcher for `worker(*args)`."""
    server_env = server_environment()
    return in_launch_environment, (dict(os.environ), server_env, worker, *args)

"""Workers forked from a preloaded server (engine/worker_start.py) see the launching
process's environment of the moment it launches, not the server's, plus what the launcher
set for each worker. (The launches themselves: tests/test_distributed.py.)"""

import multiprocessing
import os

import pytest

from bigmodel_cli.engine import worker_start
from bigmodel_cli.engine.worker_link import WorkerLink, WorkerWatch

pytestmark = pytest.mark.unit


def environment():
    return dict(os.environ)


def test_a_worker_takes_the_launch_environment_and_what_the_launcher_set(monkeypatch):
    server_env = {"PATH": "/bin", "STALE": "from the server's start", "OMP_NUM_THREADS": "1"}
    # What a forked worker holds: the server's environment, updated by the launcher.
    monkeypatch.setattr(os, "environ", dict(server_env, RANK="1", OMP_NUM_THREADS="2"))
    launch_env = {"PATH": "/bin", "NEW": "set since", "OMP_NUM_THREADS": "2"}
    seen = worker_start.in_launch_environment(launch_env, server_env, environment)
    assert seen == {"PATH": "/bin", "NEW": "set since", "OMP_NUM_THREADS": "2", "RANK": "1"}


def test_a_worker_whose_launcher_is_gone_notices(tmp_path):
    """The parent a worker starts with is the fork server, not the launcher: a launcher pid
    that no longer exists is noticed as well as a new parent."""
    watch = WorkerWatch.__new__(WorkerWatch)
    watch._parent_at_start = os.getppid()
    watch.link = WorkerLink(str(tmp_path), os.getpid(), 10.0)
    assert not watch.launcher_gone()
    gone = multiprocessing.get_context("fork").Process(target=int)
    gone.start()
    gone.join()
    watch.link = WorkerLink(str(tmp_path), gone.pid, 10.0)
    assert watch.launcher_gone()
    watch._parent_at_start = -1
    watch.link = WorkerLink(str(tmp_path), os.getpid(), 10.0)
    assert watch.launcher_gone()

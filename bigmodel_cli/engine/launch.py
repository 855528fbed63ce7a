"""Start N local worker processes through PyTorch's elastic launcher (the engine of torchrun).

The parent composes the config once and hands it to the workers; the rendezvous store
listens on a free port that the launcher picks itself, so concurrent runs and sweeps on
one machine never collide on a fixed port. Each worker keeps a WorkerLink to the parent
(engine/worker_link.py): a heartbeat the parent reads to explain a failure, and a watch
that stops the worker when the parent dies.

Workers are forks of a server process (multiprocessing's "forkserver") that imported torch
and the worker's code once, not fresh interpreters that import them each: a rank starts in a
fraction of a second instead of several seconds of imports (which, on a machine with few
cores, the ranks pay at once), and a long-lived launcher (a notebook, a test session) starts
the server once for all its launches. The server never touches a GPU (CUDA allows no fork
after it starts), and a worker takes its launcher's environment of the moment, not the
server's (`start_worker`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Dict, Optional, Sequence

from bigmodel_cli.engine.threads import LAUNCHER_OMP
from bigmodel_cli.engine.worker_link import WorkerLink, explain_failure, read_records
from bigmodel_cli.errors import TrainingStopped, UserError
from bigmodel_cli.signals import CHECKPOINT_SIGNALS, REPEAT_GRACE_S

log = logging.getLogger("bigmodel")


def rendezvous_endpoint(num_nodes: int) -> str:
    if num_nodes == 1:
        return "127.0.0.1:0"  # port 0: the launcher picks a free one
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise UserError(f"trainer.num_nodes={num_nodes} needs MASTER_ADDR and MASTER_PORT set to the same "
                        "host:port on every node (or launch with torchrun/srun instead)")
    return f"{addr}:{port}"


def launch(worker: Callable[..., Any], args: Sequence[Any], nprocs: int, num_nodes: int = 1,
           run_id: str = "", timeout_s: float = 300.0, run_dir: str = "") -> Dict[int, Any]:
    """Run `worker(*args, link)` in `nprocs` processes per node, `link` being the worker's
    WorkerLink to this process; returns {global rank: return value} for this node's ranks.
    A worker that fails or hangs ends the whole job with a UserError naming it; a stop
    signal before the workers could act on it, with TrainingStopped naming the signal."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    saved_env = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", LAUNCHER_OMP)}
    share_cpus(nprocs)
    config = launch_config(nprocs, num_nodes, run_id)
    link = WorkerLink(tempfile.mkdtemp(prefix="bigmodel-workers-"), os.getpid(), timeout_s, run_dir)
    forwarded: Dict[int, float] = {}
    seen = SeenWorkers()
    start_fork_server([*SERVER_IMPORTS, worker.__module__])
    try:
        with forward_signals_to_workers(forwarded, link), quiet_agent(), ending_silent_workers(link, seen), \
                agent_handlers_undone():
            return elastic_launch(config, start_worker)(worker, dict(os.environ), *args, link)
    except SignalException as err:  # the agent's own handlers (SIGHUP, SIGQUIT) stopped the workers
        raise TrainingStopped(f"{signal_name(err.sigval)}: the launcher stopped the workers") from None
    except ChildFailedError as err:
        if signal.SIGINT in forwarded:  # Ctrl-C while the workers were starting or stopping
            raise KeyboardInterrupt from None
        stop = next((sig for sig in forwarded if sig not in CHECKPOINT_SIGNALS), None)
        if stop is not None:  # told to stop, the workers ended before they could say so
            raise TrainingStopped(f"{signal_name(stop)}: the workers stopped before writing a new checkpoint") \
                from None
        records = read_records(link.status_dir)
        for rank, record in sorted(records.items()):
            if record.get("detail"):  # into this process's log file, not the console
                log.debug("worker rank %d failed:\n%s", rank, record["detail"])
        raise UserError(explain_failure({**seen.killed_first(records), **err.failures}, records, timeout_s)) \
            from None
    finally:
        shutil.rmtree(link.status_dir, ignore_errors=True)
        restore_env(saved_env)  # a later job of a sweep in this process measures afresh


# What the fork server imports before it forks a worker: torch, and what a worker would
# import first in any case (torch._dynamo comes with the optimizers' first step). The
# worker function's own module is added to these.
SERVER_IMPORTS = ("torch", "torch._dynamo", "torch.distributed", "bigmodel_cli.build.training")
# What the elastic agent sets for each worker itself (local_elastic_agent.py and
# multiprocessing/api.py in torch.distributed.elastic); the rest it copies from the launcher.
AGENT_KEYS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
              "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
              "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
              "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


# What the fork server ignores: the stop signals a whole process group or Slurm job step gets
# (kill -TERM -PGID, scancel, a preemption), which the workers handle (checkpoint, then stop)
# and the launcher forwards. Killed by one, the server would take its workers' exit statuses
# with it: the agent would read 255 for workers still writing their checkpoint.
SERVER_IGNORES = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
                       if hasattr(signal, name))


def start_fork_server(imports: Sequence[str]) -> None:
    """Start this process's fork server, once, importing `imports`, with SERVER_IGNORES
    ignored (a disposition that survives exec). The signals are blocked meanwhile, so one
    that comes in that moment reaches this process's own handler afterwards."""
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload(list(imports))  # no effect on a server already running
    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, SERVER_IGNORES)
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SERVER_IGNORES}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SERVER_IGNORES)


def start_worker(worker: Callable[..., Any], launcher_env: Dict[str, str], *args: Any) -> Any:
    """A worker's first step. A fork of the server has the server's signal dispositions and
    the environment it started with, a launch or more ago; a fresh process would have had
    default dispositions and the launcher's environment of this launch, plus what the agent
    set for this rank."""
    for sig in SERVER_IGNORES:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SERVER_IGNORES)
    own = {key: os.environ[key] for key in AGENT_KEYS if key in os.environ}
    os.environ.clear()
    os.environ.update({**launcher_env, **own})
    return worker(*args)


@contextmanager
def agent_handlers_undone():
    """The elastic agent installs handlers of its own (SIGHUP, SIGQUIT) and leaves them in
    place; a launcher that goes on after the launch (a sweep, a notebook) gets its own back."""
    signals = [getattr(signal, name) for name in ("SIGHUP", "SIGQUIT") if hasattr(signal, name)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(sig, handler)


def restore_env(saved: Dict[str, Optional[str]]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def share_cpus(nprocs: int) -> None:
    """Give each worker an equal share of the CPUs this process may use (engine/threads.py)
    as its OpenMP threads, instead of one thread per core each. A value the user set stays;
    ours is marked, so that workers with trainer.threads=auto do not take it for the user's."""
    from bigmodel_cli.engine.threads import idle_cpus, threads_per_rank, usable_cpus

    if "OMP_NUM_THREADS" not in os.environ or os.environ.get(LAUNCHER_OMP) == os.environ["OMP_NUM_THREADS"]:
        share = threads_per_rank("auto", nprocs, usable_cpus(idle=idle_cpus()))
        os.environ["OMP_NUM_THREADS"] = os.environ[LAUNCHER_OMP] = str(share)


def launch_config(nprocs: int, num_nodes: int, run_id: str):
    from torch.distributed.launcher.api import LaunchConfig

    endpoint = rendezvous_endpoint(num_nodes)
    # Every node must name the same rendezvous; one node alone may pick a fresh id.
    default_id = f"bigmodel-{endpoint}" if num_nodes > 1 else uuid.uuid4().hex
    # The agent's own handlers would kill the workers at once; ours let them checkpoint.
    agent_signals = ({"signals_to_handle": "SIGHUP,SIGQUIT"}
                     if "signals_to_handle" in getattr(LaunchConfig, "__dataclass_fields__", {}) else {})
    return LaunchConfig(
        min_nodes=num_nodes, max_nodes=num_nodes, nproc_per_node=nprocs,
        run_id=run_id or os.environ.get("SLURM_JOB_ID") or default_id,
        rdzv_backend="c10d", rdzv_endpoint=endpoint,
        max_restarts=0, monitor_interval=0.2, start_method="forkserver", **agent_signals)


# Once a worker has failed, the others have this long to fail on their own (and say why)
# before the launcher ends those that stay silent: a rank stuck in a collective, or frozen
# (SIGSTOP), would otherwise hold the job until trainer.dist_timeout_s, and then for the
# elastic agent's 30 s SIGTERM grace, which a frozen process cannot act on.
SILENT_GRACE_S = 5.0


@contextmanager
def ending_silent_workers(link: WorkerLink, seen: SeenWorkers):
    """For the block: once a worker has reported a failure and exited, SIGKILL the workers
    that have reported nothing SILENT_GRACE_S later. The job is over either way (every
    collective now fails), and checkpoints are written so that a kill at any moment loses
    nothing. Only this launch's workers are touched: children named in its status files.
    What it sees of the workers goes into `seen`."""
    done = threading.Event()

    def watch() -> None:
        failed_at = None
        while not done.wait(0.2):
            records = read_records(link.status_dir)
            alive = seen.look()
            if failed_at is None and any(r.get("error") and r.get("pid") not in alive for r in records.values()):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at >= SILENT_GRACE_S:
                silent = [r["pid"] for r in records.values() if not r.get("error") and r.get("pid") in alive]
                for pid in silent:
                    log.debug("ending worker pid %d: silent %.0f s after another failed", pid, SILENT_GRACE_S)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return

    thread = threading.Thread(target=watch, name="bigmodel-end-silent-workers", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        seen.look()  # the agent may have ended the launch before the watch saw the last worker go


def launched() -> Dict[int, Any]:
    """This process's live workers {pid: multiprocessing.Process}, found without polling them:
    a fork server's child reports its exit status once, on a pipe, and the elastic agent must
    be its one reader while it runs (a second reader, multiprocessing.active_children() in
    another thread, leaves the agent an exit code of 255 instead of the real one)."""
    return {proc.pid: proc for proc in list(getattr(multiprocessing.process, "_children", ())) if proc.pid}


class SeenWorkers:
    """The workers the launcher's watch saw, and when each was first seen gone."""

    def __init__(self) -> None:
        self.processes: Dict[int, Any] = {}
        self.gone_at: Dict[int, float] = {}

    def look(self) -> set:
        """The pids of the workers alive now."""
        now = time.time()
        self.processes.update(launched())
        alive = {pid for pid in self.processes if running(pid)}
        for pid in self.processes.keys() - alive:
            self.gone_at.setdefault(pid, now)
        return alive

    def killed_first(self, records: Dict[int, Dict[str, Any]]) -> Dict[int, Any]:
        """{rank: process} of the workers a signal ended (not the agent's SIGTERM) before any
        rank reported an error, or at about the same moment: a kill and its peer's failure
        (a closed connection) come together, and the agent may name the peer. Read once the
        agent is done with them. A worker killed later, by the agent or by
        `ending_silent_workers`, is a consequence: not counted."""
        reported = [float(r.get("heartbeat", 0)) for r in records.values() if r.get("error")]
        first_error = min(reported, default=float("inf"))
        killed = {}
        for rank, record in records.items():
            proc = self.processes.get(record.get("pid"))
            try:
                code = proc.exitcode if proc is not None else None
            except ValueError:  # closed
                continue
            after_error = self.gone_at.get(record.get("pid"), float("inf")) - first_error
            log.debug("worker rank %d (pid %s): exit code %s, seen gone %.2f s after the first error",
                      rank, record.get("pid"), code, after_error)
            if code is not None and code < 0 and code != -signal.SIGTERM and after_error <= SILENT_GRACE_S / 2:
                killed[rank] = proc
        return killed


def running(pid: int) -> bool:
    """Whether `pid` is still there (a fork server reaps its children at once: no zombies)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def quiet_agent():
    """The agent narrates every rendezvous step and logs each failure with a traceback;
    bigmodel reports the outcome itself, in one line."""
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextmanager
def forward_signals_to_workers(first: Dict[int, float], link: WorkerLink):
    """Pass SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 on to the workers, which checkpoint and
    stop (or requeue) on their own, instead of letting the elastic agent kill them. A second
    SIGINT or SIGTERM, after a moment, stops everything at once. SIGUSR1/2 ("checkpoint")
    go only to workers that handle them already: they would end one still starting up.
    `first` records when each signal first came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT, *CHECKPOINT_SIGNALS)

    def forward(signum, frame):
        if signum not in CHECKPOINT_SIGNALS and signum in first:
            if time.monotonic() - first[signum] > REPEAT_GRACE_S:
                raise KeyboardInterrupt  # asked again: the agent then stops the workers
            return  # the same signal again at once (Ctrl-C also reaches the workers directly)
        first.setdefault(signum, time.monotonic())
        ready = {r.get("pid") for r in read_records(link.status_dir).values()} \
            if signum in CHECKPOINT_SIGNALS else None
        for pid in launched():
            if ready is None or pid in ready:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in signals}
    # (What LaunchConfig.signals_to_handle sets, for torch versions without that field.)
    saved = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if saved is None:
            os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
        else:
            os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = saved



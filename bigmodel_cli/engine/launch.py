"""Start N local worker processes through PyTorch's elastic launcher (the engine of torchrun).

The parent composes the config once and hands it to the workers; the rendezvous store
listens on a free port that the launcher picks itself, so concurrent runs and sweeps on
one machine never collide on a fixed port.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Dict, Sequence

from bigmodel_cli.engine.stopping import REPEAT_GRACE_S
from bigmodel_cli.errors import UserError

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
           run_id: str = "") -> Dict[int, Any]:
    """Run `worker(*args)` in `nprocs` processes per node; returns {global rank: return value}
    for this node's ranks. A worker that dies ends the whole job with a UserError naming it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent narrates every rendezvous step at INFO; keep the console for training.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    # As torchrun does: workers share the cores instead of each starting one thread per core.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs)))
    endpoint = rendezvous_endpoint(num_nodes)
    # Every node must name the same rendezvous; one node alone may pick a fresh id.
    default_id = f"bigmodel-{endpoint}" if num_nodes > 1 else uuid.uuid4().hex
    # The agent's own handlers would kill the workers at once; ours let them checkpoint.
    agent_signals = ({"signals_to_handle": "SIGHUP,SIGQUIT"}
                     if "signals_to_handle" in getattr(LaunchConfig, "__dataclass_fields__", {}) else {})
    config = LaunchConfig(
        min_nodes=num_nodes, max_nodes=num_nodes, nproc_per_node=nprocs,
        run_id=run_id or os.environ.get("SLURM_JOB_ID") or default_id,
        rdzv_backend="c10d", rdzv_endpoint=endpoint,
        max_restarts=0, monitor_interval=0.2, start_method="spawn", **agent_signals)
    forwarded: Dict[int, float] = {}
    try:
        with forward_signals_to_workers(forwarded):
            return elastic_launch(config, worker)(*args)
    except SignalException:  # Ctrl-C or a scheduler's SIGTERM: the agent has stopped the workers
        raise KeyboardInterrupt from None
    except ChildFailedError as err:
        if any(sig != signal.SIGUSR1 for sig in forwarded):  # a worker still starting up was stopped
            raise KeyboardInterrupt from None
        # A rank killed by a signal is the likely cause; its peers' failures the consequence.
        failed = sorted(err.failures.items(), key=lambda item: (item[1].exitcode >= 0, item[0]))
        rank, failure = failed[0]
        others = "".join(f"; rank {r} {describe_exit(f.exitcode)}" for r, f in failed[1:])
        raise UserError(f"worker rank {rank} failed ({describe_exit(failure.exitcode)}){others}, and the job "
                        f"was stopped; see train_rank{rank}.log in the run dir") from None


@contextmanager
def forward_signals_to_workers(first: Dict[int, float]):
    """Pass SIGTERM, SIGINT and SIGUSR1 on to the workers, which checkpoint and stop (or
    requeue) on their own, instead of letting the elastic agent kill them. A second
    SIGINT or SIGTERM, after a moment, stops everything at once. `first` records when each
    signal first came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def forward(signum, frame):
        if signum in first:
            if signum != signal.SIGUSR1 and time.monotonic() - first[signum] > REPEAT_GRACE_S:
                raise KeyboardInterrupt  # asked again: the agent then stops the workers
            return  # the same signal again at once (Ctrl-C also reaches the workers directly)
        first[signum] = time.monotonic()
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
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


def describe_exit(code: int) -> str:
    if code < 0:
        import signal

        return f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"signal {-code}"
    return f"exit code {code}"

"""What a launched worker tells its launcher, and how it notices the launcher is gone.

Each worker that `bigmodel train trainer.devices=N` starts gets a `WorkerLink`: a status
file in a folder its launcher made, refreshed every second (a heartbeat) and written at
once, with a one-line reason, when the worker fails. When the job fails, the launcher reads
them to name the rank that caused it (`explain_failure`): the one with an error of its
own, one killed by a signal, or one that stopped answering while the others waited.

The same thread watches the launcher: when it dies (kill -9, say), rank 0 takes over the run
dir's lock the launcher held, the worker stops as if told SIGTERM (checkpoint, then exit)
and, should that not end it, exits hard once trainer.dist_timeout_s has passed, so no worker
outlives its launcher for long.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

log = logging.getLogger("bigmodel")

BEAT_S = 1.0
WATCH_S = 0.2  # how often the launcher's death is looked for
EXIT_ORPHANED = 70  # EX_SOFTWARE: the launcher died and the worker could not stop on its own
# What a rank reports when it was only waiting on another one (a collective timed out, or a
# peer's connection closed): a consequence, not the cause.
WAITING = re.compile(r"timed? ?out|timeout|connection (was )?(closed|reset|refused)|broken pipe|"
                     r"peer|socket|DistNetworkError|DistBackendError|DistStoreError", re.IGNORECASE)


@dataclass(frozen=True)
class WorkerLink:
    status_dir: str
    parent_pid: int
    timeout_s: float
    run_dir: str = ""  # the run dir the launcher holds the lock of

    def status_file(self, rank: int) -> Path:
        return Path(self.status_dir) / f"rank{rank}.json"

    def watch(self) -> "WorkerWatch":
        """Start this worker's heartbeat and launcher watch (rank from the environment)."""
        return WorkerWatch(self, int(os.environ.get("RANK", "0")))


class WorkerWatch:
    def __init__(self, link: WorkerLink, rank: int):
        self.link, self.rank = link, rank
        self.record: Dict[str, Any] = {"rank": rank, "pid": os.getpid()}
        self.parent = os.getppid()  # the launcher, or the fork server it started (engine/launch.py)
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self.write()
        self._thread = threading.Thread(target=self._run, name="bigmodel-worker-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        orphaned_at: Optional[float] = None
        last_beat = 0.0
        while not self._stop.wait(WATCH_S):
            if orphaned_at is None and self.launcher_gone():
                orphaned_at = time.monotonic()
                self._orphaned()
            elif orphaned_at is not None and time.monotonic() - orphaned_at > self.link.timeout_s:
                self._exit("the launcher is gone and this worker did not stop within trainer.dist_timeout_s="
                           f"{self.link.timeout_s:g} s")
            if time.monotonic() - last_beat >= BEAT_S:
                self.write()
                last_beat = time.monotonic()

    def launcher_gone(self) -> bool:
        """When the launcher dies, this process's parent changes (the launcher itself, or the
        fork server, which exits with it); a launcher already gone when the watch began is no
        longer there to signal."""
        if os.getppid() != self.parent:
            return True
        try:
            os.kill(self.link.parent_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # there, under another user: not ours, but not gone
            pass
        return False

    def _orphaned(self) -> None:
        """The launcher died, and its run dir lock with it: rank 0, the one that writes,
        takes the lock over before the stop checkpoint (or, if another run got there
        first, writes nothing), then the loop stops as on SIGTERM."""
        log.warning("the launcher (pid %d) is gone: stopping as if told SIGTERM", self.link.parent_pid)
        if self.rank == 0 and self.link.run_dir:
            from bigmodel_cli.run_lock import acquire

            try:
                acquire(Path(self.link.run_dir))
            except Exception as err:
                self._exit(f"the launcher is gone and its run dir is taken ({err}); exiting without writing")
        os.kill(os.getpid(), signal.SIGTERM)  # the loop checkpoints and stops

    @staticmethod
    def _exit(message: str) -> None:
        log.error("%s", message)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_ORPHANED)

    def write(self) -> None:
        """Refresh the status file (atomically: the launcher never reads half of one)."""
        path = self.link.status_file(self.rank)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with self._write_lock:
            try:
                tmp.write_text(json.dumps({**self.record, "heartbeat": time.time()}), encoding="utf-8")
                os.replace(tmp, path)
            except OSError:  # the launcher removed the folder: it is done with us
                pass

    def failed(self, message: str, waiting: Optional[bool] = None, detail: str = "") -> None:
        """Record this rank's one-line reason for failing (and a traceback, for the launcher's
        log file). `waiting`: it was only waiting on another rank (guessed from the message
        when not given)."""
        waiting = bool(WAITING.search(message)) if waiting is None else waiting
        self.record.update(error=message, waiting=waiting, detail=detail[-20000:])
        self.write()

    def close(self) -> None:
        """Stop the thread (a worker's thread otherwise runs until its process ends)."""
        self._stop.set()


# --------------------------------------------------------------------------- launcher side


def read_records(status_dir: str) -> Dict[int, Dict[str, Any]]:
    records = {}
    for path in Path(status_dir).glob("rank*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            records[int(record["rank"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def explain_failure(failures: Mapping[int, Any], records: Mapping[int, Dict[str, Any]], timeout_s: float,
                    now: Optional[float] = None) -> str:
    """One line naming the rank that made the job fail, and why. `failures`: the launcher's
    {rank: failure with .exitcode} of ranks that ended badly; `records`: the status files."""
    now = time.time() if now is None else now
    own = [r for r in sorted(records) if records[r].get("error") and not records[r].get("waiting")]
    if own:
        return f"worker rank {own[0]} failed: {records[own[0]]['error']}"
    killed = [r for r in sorted(failures) if failures[r].exitcode < 0]
    if killed:
        return f"worker rank {killed[0]} was {describe_exit(failures[killed[0]].exitcode)}"
    waiting = [r for r in sorted(records) if records[r].get("error")]
    silent = [r for r in sorted(records) if not records[r].get("error")]
    if waiting and silent:
        rank = silent[0]
        quiet_for = now - float(records[rank].get("heartbeat", now))
        how = (f"was frozen or stopped (no sign of life for {quiet_for:.0f} s)" if quiet_for > 3 * BEAT_S
               else "was stuck (alive, but not taking part)")
        return (f"worker rank {rank} stopped responding: it {how}, and rank {waiting[0]} gave up waiting for it "
                f"after trainer.dist_timeout_s={timeout_s:g} s")
    if waiting:
        return f"worker rank {waiting[0]} failed: {records[waiting[0]]['error']}"
    rank = sorted(failures)[0] if failures else 0
    code = failures[rank].exitcode if failures else 1
    return f"worker rank {rank} failed ({describe_exit(code)})"


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        hint = " (the out-of-memory killer, or kill -9)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"

"""One writer per run dir.

A training run holds an exclusive lock on `<run dir>/.bigmodel.lock` for its whole life,
taken before Hydra writes anything into the dir (a Hydra callback, `RunDirLock`) and again,
re-entrantly, by `bigmodel train` itself. A second `bigmodel train` on the same dir stops
at once, naming the live holder. Under several ranks only rank 0 of the job (or our
launcher's parent process) holds it.

The lock is `flock(2)`, which the kernel releases when its holder dies, however it dies
(kill -9 included): a dead run never blocks `trainer.resume=auto`. The file also records
the holder (host, pid, start, "released" once done) and a heartbeat, refreshed every 30 s,
which covers shared file systems where a lost node's lock may outlive it: a holder on
another host that has been silent for 10 minutes is taken over, with a warning. Where the
file system has no locks at all, the record alone decides, on the same rules. A run dir
inside a live sweep's dir, and a sweep dir over live run dirs, are refused too. See the
README's "Shared file systems" for NFS and Lustre.

No torch here: the lock is taken before anything heavy is imported.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Set

from bigmodel_cli.errors import EXIT_USER_ERROR, UserError, debug_requested

try:  # not on Windows; there the record alone decides
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger("bigmodel")

LOCK_NAME = ".bigmodel.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
# flock errors that mean "this file system has no locks", not "someone holds it".
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirBusy(UserError):
    """Another live process writes into this run dir."""


@dataclass
class _Held:
    fd: int
    count: int = 1
    stop: threading.Event = field(default_factory=threading.Event)
    heartbeat: Optional[threading.Thread] = None


_HELD: Dict[str, _Held] = {}
_GUARD = threading.Lock()
RECORD_BYTES = 1024


def acquire(run_dir: Path, sweep: bool = False) -> None:
    """Take the run dir's lock, or raise RunDirBusy naming its live holder. Re-entrant
    within a process (the Hydra callback and the train command both take it). Also refused:
    a run dir inside a live sweep's dir, and (`sweep`) a sweep dir over live run dirs."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    with _GUARD:
        if key in _HELD:
            _HELD[key].count += 1
            return
        fd = _open_lock_file(run_dir)
        try:
            holder = _take(fd, run_dir)
            if holder is not None:
                raise RunDirBusy(_busy_message(run_dir, holder))
            _write_record(fd)
            _refuse_overlap(run_dir, sweep)
        except BaseException:
            os.close(fd)
            raise
        held = _HELD[key] = _Held(fd)
        held.heartbeat = threading.Thread(target=_heartbeat, args=(fd, held.stop), name="bigmodel-run-lock",
                                          daemon=True)
        held.heartbeat.start()


def release(run_dir: Path) -> None:
    key = str(Path(run_dir).resolve())
    with _GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[key]
        held.stop.set()
        if held.heartbeat is not None:
            held.heartbeat.join()  # it writes to the descriptor: done before it closes
        try:
            _write_record(held.fd, released=True)  # what lock-less file systems go by
        except OSError:
            pass
        os.close(held.fd)  # releases the flock


@contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def live_holder(folder: Path) -> Optional[Dict[str, Any]]:
    """The record of whoever else holds `folder`'s lock now, or None (no lock file, a free
    lock, this process's own). Never creates a lock file."""
    if str(Path(folder).resolve()) in _HELD:
        return None
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDWR)
    except OSError:
        return None
    try:
        if fcntl is None:
            return _live(_read_record(fd))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: held for an instant, released on close
        except BlockingIOError:
            holder = _read_record(fd)
            return None if _overrulable(holder) else holder
        except OSError:
            return _live(_read_record(fd))
        return None
    finally:
        os.close(fd)


#: set by a sweep for its jobs, which may run in processes of their own (joblib, submitit)
SWEEP_ENV = "BIGMODEL_SWEEP_DIR"


def sweep_token(sweep_dir: Path) -> str:
    """What a sweep hands its jobs: its dir and the process holding its lock."""
    return json.dumps({"dir": str(Path(sweep_dir).resolve()), "pid": os.getpid(), "host": socket.gethostname()})


def _job_of(holder: Dict[str, Any], sweep_dir: Path) -> bool:
    """Whether this process is a job of the sweep that `holder` (its lock's record) runs."""
    try:
        token = json.loads(os.environ.get(SWEEP_ENV, ""))
    except ValueError:
        return False
    return isinstance(token, dict) and token.get("dir") == str(sweep_dir.resolve()) \
        and token.get("pid") == holder.get("pid") and token.get("host") == holder.get("host")


def _refuse_overlap(run_dir: Path, sweep: bool) -> None:
    above = live_holder(run_dir.parent)
    if above is not None and not _job_of(above, run_dir.parent):
        raise RunDirBusy(f"run dir {run_dir} is inside {run_dir.parent}, which another bigmodel train "
                         f"({_describe(above)}) writes into; pick a hydra.run.dir outside it")
    for child in sorted(p for p in run_dir.iterdir() if p.is_dir()) if sweep else ():
        below = live_holder(child)
        if below is not None:
            raise RunDirBusy(f"sweep dir {run_dir} holds {child}, a run dir in use by another bigmodel train "
                             f"({_describe(below)}); pick another hydra.sweep.dir")


def _open_lock_file(run_dir: Path) -> int:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot write into run dir {run_dir} ({err.strerror}); run from a writable folder or "
                        "set hydra.run.dir=<a writable path>") from None


def _take(fd: int, run_dir: Path) -> Optional[Dict[str, Any]]:
    """Take the lock: None, or the record of the live holder that keeps it."""
    if fcntl is None:
        return _live(_read_record(fd))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        holder = _settled_record(fd)
        if not _overrulable(holder):
            return holder
        log.warning("run dir %s: taking over the lock of %s, which %s", run_dir, _describe(holder),
                    "was released" if holder.get("released") else
                    f"has given no sign of life for {time.time() - holder['heartbeat']:.0f} s")
        return None
    except OSError as err:
        if err.errno not in NO_LOCKS:
            raise UserError(f"cannot lock run dir {run_dir} ({err.strerror})") from None
        log.debug("run dir %s: the file system has no locks (%s); going by the holder record", run_dir,
                  err.strerror)
        return _live(_read_record(fd))


def _settled_record(fd: int, wait_s: float = 1.0) -> Dict[str, Any]:
    """The holder's record; a holder that has just taken the lock may not have written it yet."""
    deadline = time.monotonic() + wait_s
    holder = _read_record(fd)
    while not holder and time.monotonic() < deadline:
        time.sleep(0.05)
        holder = _read_record(fd)
    return holder


def _overrulable(holder: Dict[str, Any]) -> bool:
    """Whether a lock the kernel (or a shared file system's server) reports as held can be
    taken anyway: its holder released it (a file system that kept a lost node's lock), or it
    is on another host and has been silent for STALE_AFTER_S."""
    if holder.get("released"):
        return True
    return bool(holder) and holder["host"] != socket.gethostname() and _is_stale(holder)


def _live(holder: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Where the file system has no locks, the record alone says whether a holder lives."""
    return holder if holder and not _is_stale(holder) else None


def _is_stale(holder: Dict[str, Any]) -> bool:
    """A holder record that no live process stands behind (or none at all)."""
    if not holder or holder.get("released"):
        return True
    if holder["host"] == socket.gethostname():
        return not _pid_alive(holder["pid"])
    return time.time() - holder["heartbeat"] > STALE_AFTER_S


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _busy_message(run_dir: Path, holder: Dict[str, Any]) -> str:
    other_host = holder.get("host") not in (None, socket.gethostname())
    note = (f"; its last sign of life was {time.time() - holder['heartbeat']:.0f} s ago, and one silent for "
            f"{STALE_AFTER_S / 60:.0f} minutes is taken over" if other_host else "")
    return (f"run dir {run_dir} is in use by another bigmodel train ({_describe(holder)}){note}; wait for it "
            "to end (or stop it), then the same command continues it (trainer.resume=auto), or pick another "
            "hydra.run.dir")


def _describe(holder: Dict[str, Any]) -> str:
    if not holder:
        return "a process that left no record"
    return f"pid {holder['pid']} on {holder['host']}, started {holder.get('started', '?')}"


def _read_record(fd: int) -> Dict[str, Any]:
    try:
        raw = os.pread(fd, RECORD_BYTES, 0)
        record = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):  # torn or foreign content: no usable record
        return {}
    usable = (isinstance(record, dict) and isinstance(record.get("host"), str)
              and isinstance(record.get("pid"), int) and isinstance(record.get("heartbeat"), (int, float)))
    return record if usable else {}


def _write_record(fd: int, started: Optional[str] = None, released: bool = False) -> None:
    """One write of a fixed size over the old record, so a reader never finds it empty or
    half old, half new."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time(),
              "started": started or time.strftime("%Y-%m-%d %H:%M:%S"), "argv": [a[:80] for a in sys.argv[:4]]}
    if released:
        record["released"] = True
    data = json.dumps(record).encode("utf-8")[:RECORD_BYTES]
    os.pwrite(fd, data.ljust(RECORD_BYTES), 0)


def _heartbeat(fd: int, stop: threading.Event) -> None:
    started = _read_record(fd).get("started")
    while not stop.wait(HEARTBEAT_S):
        try:
            _write_record(fd, started)
        except OSError:  # a full or vanished disk: the run itself reports that
            pass


# --------------------------------------------------------------------------- Hydra


def quiet_rank() -> bool:
    """This process is a non-zero rank of a torchrun/srun world (rank 0 holds the lock)."""
    if "RANK" in os.environ:
        return os.environ["RANK"] != "0"
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return os.environ.get("SLURM_PROCID", "0") != "0"
    return False


#: the run dir (or sweep dir) this start created, and the parents made with it; reset at
#: each start, so a dir made by an earlier command in the same process never counts
CREATED_HERE: Set[str] = set()
#: the sweep dir this start created: its job dirs count as created here too
CREATED_SWEEP: Set[str] = set()


def created_here(run_dir: Path) -> bool:
    """Whether this start made `run_dir` (or the sweep dir it is a job of)."""
    run_dir = Path(run_dir).resolve()
    return str(run_dir) in CREATED_HERE or str(run_dir.parent) in CREATED_SWEEP


def _from_hydra_callback(run_dir: Path, sweep: bool = False) -> None:
    """Take the lock from a Hydra callback; a refusal ends the command with one line."""
    CREATED_HERE.clear()
    CREATED_SWEEP.clear()
    new = Path(run_dir).resolve()
    if sweep and not new.exists():
        CREATED_SWEEP.add(str(new))
    while not new.exists():  # the run dir and any of its parents that Hydra is about to make
        CREATED_HERE.add(str(new))
        new = new.parent
    try:
        acquire(run_dir, sweep)
    except UserError as err:
        if debug_requested():
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra < 1.1
    Callback = object


class RunDirLock(Callback):
    """Registered in conf/train.yaml: holds the run dir (or, for -m, the sweep dir) from
    before Hydra writes its files into it until the command ends."""

    def on_run_start(self, config, **kwargs: Any) -> None:
        if not quiet_rank():
            _from_hydra_callback(Path(str(config.hydra.run.dir)))

    def on_run_end(self, config, **kwargs: Any) -> None:
        if not quiet_rank():
            release(Path(str(config.hydra.run.dir)))

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        if not quiet_rank():
            sweep_dir = Path(str(config.hydra.sweep.dir))
            _from_hydra_callback(sweep_dir, sweep=True)
            # Jobs in other processes inherit it: they are this sweep's, not intruders.
            os.environ[SWEEP_ENV] = sweep_token(sweep_dir)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if not quiet_rank():
            release(Path(str(config.hydra.sweep.dir)))
            os.environ.pop(SWEEP_ENV, None)


class NewRunDirLock(RunDirLock):
    """RunDirLock for a command that only ever makes a new dir of its own (lr-find): a
    hydra.run.dir that already holds anything (a training run, say) is refused before
    Hydra writes its files into it."""

    def on_run_start(self, config, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir))
        if not quiet_rank() and run_dir.is_dir() and any(run_dir.iterdir()):
            print(f"error: {run_dir} already holds files; this command writes only into a new dir of its "
                  "own: leave hydra.run.dir at its default or name a folder that does not exist yet",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        super().on_run_start(config, **kwargs)

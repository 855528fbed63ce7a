"""One writer per run dir.

A training run holds an exclusive lock on `<run dir>/.bigmodel.lock` for its whole life,
taken before Hydra writes anything into the dir (a Hydra callback, `RunDirLock`) and again,
re-entrantly, by `bigmodel train` itself. A second `bigmodel train` on the same dir stops
at once, naming the live holder. Under several ranks only rank 0 of the job (or our
launcher's parent process) holds it.

The lock is `flock(2)`, which the kernel releases when its holder dies, however it dies
(kill -9 included): a dead run never blocks `trainer.resume=auto`. The file also records
the holder (host, pid, start) and a heartbeat, refreshed every 30 s, which covers shared
file systems where a lost node's lock may outlive it: a holder on another host that has
been silent for 10 minutes is taken over, with a warning. Where the file system has no
locks at all, the record alone decides, on the same rules. See the README's "Shared file
systems" for NFS and Lustre.

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
from typing import Any, Dict, Iterator, Optional

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


_HELD: Dict[str, _Held] = {}
_GUARD = threading.Lock()


def acquire(run_dir: Path) -> None:
    """Take the run dir's lock, or raise RunDirBusy naming its live holder. Re-entrant
    within a process (the Hydra callback and the train command both take it)."""
    key = str(Path(run_dir).resolve())
    with _GUARD:
        if key in _HELD:
            _HELD[key].count += 1
            return
        fd = _open_lock_file(Path(run_dir))
        try:
            _lock(fd, Path(run_dir))
            _write_record(fd)
        except BaseException:
            os.close(fd)
            raise
        held = _HELD[key] = _Held(fd)
    threading.Thread(target=_heartbeat, args=(fd, held.stop), name="bigmodel-run-lock", daemon=True).start()


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
        try:
            os.ftruncate(held.fd, 0)  # no holder any more (what lock-less file systems go by)
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


def _open_lock_file(run_dir: Path) -> int:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot write into run dir {run_dir} ({err.strerror}); run from a writable folder or "
                        "set hydra.run.dir=<a writable path>") from None


def _lock(fd: int, run_dir: Path) -> None:
    if fcntl is None:
        _check_record_only(fd, run_dir)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_record(fd)
        if not _is_stale(holder):
            raise RunDirBusy(_busy_message(run_dir, holder)) from None
        log.warning("run dir %s: taking over the lock of %s, which has given no sign of life for %.0f s",
                    run_dir, _describe(holder), time.time() - holder.get("heartbeat", 0))
    except OSError as err:
        if err.errno not in NO_LOCKS:
            raise UserError(f"cannot lock run dir {run_dir} ({err.strerror})") from None
        log.debug("run dir %s: the file system has no locks (%s); going by the holder record", run_dir,
                  err.strerror)
        _check_record_only(fd, run_dir)


def _check_record_only(fd: int, run_dir: Path) -> None:
    holder = _read_record(fd)
    if holder and not _is_stale(holder):
        raise RunDirBusy(_busy_message(run_dir, holder))


def _is_stale(holder: Dict[str, Any]) -> bool:
    """A holder record that no live process stands behind (or none at all)."""
    if not holder:
        return True
    if holder.get("host") == socket.gethostname():
        return not _pid_alive(holder.get("pid"))
    return time.time() - float(holder.get("heartbeat", 0)) > STALE_AFTER_S


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _busy_message(run_dir: Path, holder: Dict[str, Any]) -> str:
    silent = time.time() - float(holder.get("heartbeat", time.time()))
    other_host = holder.get("host") not in (None, socket.gethostname())
    note = (f"; its last sign of life was {silent:.0f} s ago, and one silent for {STALE_AFTER_S / 60:.0f} minutes "
            "is taken over" if other_host else "")
    return (f"run dir {run_dir} is in use by another bigmodel train ({_describe(holder)}){note}; wait for it "
            "to end (or stop it), then run the same command again to continue it, or pick another "
            "hydra.run.dir")


def _describe(holder: Dict[str, Any]) -> str:
    if not holder:
        return "a process that left no record"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started', '?')}"


def _read_record(fd: int) -> Dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):  # torn or foreign content: no usable record
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(fd: int, started: Optional[str] = None) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time(),
              "started": started or time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[:8]}
    data = json.dumps(record).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


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


def _from_hydra_callback(run_dir: Path) -> None:
    """Take the lock from a Hydra callback; a refusal ends the command with one line."""
    try:
        acquire(run_dir)
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
            _from_hydra_callback(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if not quiet_rank():
            release(Path(str(config.hydra.sweep.dir)))

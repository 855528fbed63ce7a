"""One writer per run dir (issue 11, section 2): a second `bigmodel train` on a live run dir
stops at once and changes nothing; a lock left by a killed run never blocks resuming."""

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigmodel_cli import run_lock
from bigmodel_cli.errors import UserError
from test_resume import clean_env, start_cli, wait_for_step


LONG = ("trainer.max_steps=100000", "trainer.val_every=50", "trainer.log_every=10", "trainer.progress=plain",
        "model.hidden_sizes=[32]")


def snapshot(folder: Path, names):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


@pytest.mark.e2e
def test_a_second_writer_on_a_live_run_dir_is_refused_at_once(run_cli, tmp_path):
    first = start_cli(tmp_path, *LONG, "hydra.run.dir=run")
    run = tmp_path / "run"
    try:
        wait_for_step(first, run / "metrics.jsonl", 50)
        kept = [".hydra/config.yaml", ".hydra/overrides.yaml", "config.yaml"]
        before = snapshot(run, kept)
        second = run_cli("train", *LONG, "trainer.log_every=7", "hydra.run.dir=run", timeout=120)
        assert first.poll() is None, "the first run should still be training"
        assert second.returncode == 2, second.output
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"is in use by another bigmodel train (pid {first.pid} on " in lines[0], lines
        assert "then the same command continues it (trainer.resume=auto)" in lines[0]
        # Nothing of the first run was touched: Hydra's files, the config, its log.
        assert snapshot(run, kept) == before
        assert "trainer.log_every=7" not in (run / "train.log").read_text()
    finally:
        first.kill()
        first.communicate()
    # kill -9 left the lock file behind, but no holder: the same command continues the run.
    resumed = run_cli("train", *LONG[1:], "trainer.max_steps=60", "hydra.run.dir=run", timeout=300)
    assert resumed.returncode == 0, resumed.output
    assert "resuming from" in resumed.output


@pytest.mark.e2e
def test_two_runs_started_together_leave_one_run(tmp_path):
    args = ("trainer.max_steps=30", "trainer.val_every=10", "trainer.progress=plain", "hydra.run.dir=run")
    procs = [start_cli(tmp_path, *args, f"trainer.seed={seed}") for seed in (1, 2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    winner = next(i for i, p in enumerate(procs) if p.returncode == 0)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert f"trainer.seed={winner + 1}" in summary["overrides"]
    assert f"seed: {winner + 1}" in (run / "config.yaml").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/loss" in r] == [0, 10, 20, 30]  # one run's, not two


@pytest.mark.e2e
def test_a_second_sweep_into_the_same_sweep_dir_is_refused(run_cli, tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "bigmodel_cli", "train", "-m", "optim.lr=1e-3,2e-3",
                              *LONG[1:], "trainer.max_steps=100000", "hydra.sweep.dir=sweep"], cwd=tmp_path,
                             env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "sweep" / "0" / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and first.poll() is None, "the first sweep did not start"
            time.sleep(0.2)
        second = run_cli("train", "-m", "optim.lr=1e-3,2e-3", "trainer.max_steps=5", "hydra.sweep.dir=sweep")
        assert second.returncode == 2
        assert f"is in use by another bigmodel train (pid {first.pid}" in second.stderr, second.output
    finally:
        first.kill()
        first.wait()


# ------------------------------------------------------------------ the lock itself


def holder_in_subprocess(run_dir: Path):
    """Another process that takes the lock and keeps it until killed."""
    code = (f"import sys, time; from pathlib import Path; from bigmodel_cli import run_lock; "
            f"run_lock.acquire(Path({str(run_dir)!r})); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.e2e
def test_the_lock_is_reentrant_and_released(tmp_path):
    run_lock.acquire(tmp_path)
    run_lock.acquire(tmp_path)  # the Hydra callback and the train command both take it
    run_lock.release(tmp_path)
    other = subprocess.run([sys.executable, "-c", f"from pathlib import Path; from bigmodel_cli import run_lock; "
                            f"run_lock.acquire(Path({str(tmp_path)!r}))"], capture_output=True, text=True)
    assert other.returncode != 0 and "RunDirBusy" in other.stderr
    run_lock.release(tmp_path)
    run_lock.acquire(tmp_path)
    run_lock.release(tmp_path)
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["released"]  # no holder any more


@pytest.mark.e2e
def test_a_live_holder_blocks_and_a_dead_one_does_not(tmp_path):
    holder = holder_in_subprocess(tmp_path)
    try:
        with pytest.raises(run_lock.RunDirBusy, match=f"pid {holder.pid} on {socket.gethostname()}"):
            run_lock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run_lock.acquire(tmp_path)  # the kernel dropped the dead holder's lock
    run_lock.release(tmp_path)


@pytest.mark.e2e
def test_a_live_holder_without_a_readable_record_still_blocks(tmp_path):
    holder = holder_in_subprocess(tmp_path)
    try:
        (tmp_path / run_lock.LOCK_NAME).write_text("garbage")  # torn, or written by something else
        with pytest.raises(run_lock.RunDirBusy, match="a process that left no record"):
            run_lock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without locks (some Lustre and NFS mounts): the holder record decides."""
    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", unsupported)


def write_record(folder: Path, **record):
    (folder / run_lock.LOCK_NAME).write_text(json.dumps(record))


@pytest.mark.e2e
def test_without_flock_the_record_decides(tmp_path, no_flock):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_record(tmp_path, pid=sleeper.pid, host=socket.gethostname(), heartbeat=time.time())
        with pytest.raises(run_lock.RunDirBusy):
            run_lock.acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    run_lock.acquire(tmp_path)  # its holder is dead: taken over
    run_lock.release(tmp_path)


@pytest.mark.unit
def test_a_holder_on_another_host_is_taken_over_once_silent(tmp_path, no_flock):
    write_record(tmp_path, pid=1, host="lost-node", heartbeat=time.time())
    with pytest.raises(run_lock.RunDirBusy, match="last sign of life was 0 s ago"):
        run_lock.acquire(tmp_path)
    write_record(tmp_path, pid=1, host="lost-node", heartbeat=time.time() - run_lock.STALE_AFTER_S - 5)
    run_lock.acquire(tmp_path)
    run_lock.release(tmp_path)


@pytest.mark.e2e
def test_after_taking_over_a_lost_nodes_lock_the_next_run_can_too(tmp_path):
    """A shared file system's server may keep a lost node's lock: after one run took it over
    and ended, the next one must not be blocked by that same stale lock."""
    holder = holder_in_subprocess(tmp_path)  # stands for the server keeping the lost node's lock
    try:
        write_record(tmp_path, pid=1, host="lost-node", heartbeat=time.time() - run_lock.STALE_AFTER_S - 5)
        for _ in range(2):
            run_lock.acquire(tmp_path)
            run_lock.release(tmp_path)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.e2e
def test_a_run_inside_a_live_sweep_and_a_sweep_over_live_runs_are_refused(tmp_path):
    sweep = tmp_path / "sweep"
    holder = holder_in_subprocess(sweep)
    try:
        with pytest.raises(run_lock.RunDirBusy, match="is inside .*sweep, which another bigmodel train"):
            run_lock.acquire(sweep / "0")
    finally:
        holder.kill()
        holder.wait()
    job = holder_in_subprocess(sweep / "0")
    try:
        with pytest.raises(run_lock.RunDirBusy, match="holds .*0, a run dir in use by another bigmodel train"):
            run_lock.acquire(sweep, sweep=True)
        run_lock.acquire(sweep / "1")  # a run dir beside it is fine
        run_lock.release(sweep / "1")
    finally:
        job.kill()
        job.wait()


@pytest.mark.unit
def test_an_unwritable_run_dir_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(run_lock.os, "open", refuse)
    with pytest.raises(UserError, match="cannot write into run dir .*Permission denied"):
        run_lock.acquire(tmp_path / "run")
    assert os.path.exists(tmp_path)

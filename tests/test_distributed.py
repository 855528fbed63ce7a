"""Several processes on CPU (gloo, 2 ranks, tiny models): our launcher, torchrun, srun's env."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bigmodel_cli.data.base import SequentialBatches
from bigmodel_cli.data.windows import SequentialWindows
from bigmodel_cli.engine.distributed import detect, first_slurm_host
from bigmodel_cli.engine.launch import SILENT_GRACE_S, SeenWorkers, agent_handlers_undone, start_worker
from conftest import slurm_is_up


# Dropout off and per-step logging, so two runs can be compared step by step.
TINY = ("data=synthetic", "data.num_samples=800", "model.hidden_sizes=[32]", "model.dropout=0.0",
        "trainer.max_steps=20", "trainer.log_every=1", "trainer.val_every=10", "trainer.progress=plain")


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """Every process these tests start runs on CPU over gloo, also on a GPU machine (where
    two ranks would otherwise share its one GPU)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def fresh_dir(path):
    path.mkdir()
    return path


def children(parent_pid, marker: bytes):
    """The child processes of `parent_pid` whose command line holds `marker`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent_pid and marker in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def server_pids(launcher_pid):
    """The launcher's fork server (engine/launch.py) and its other multiprocessing helpers."""
    return children(launcher_pid, b"multiprocessing")


def worker_pids(launcher_pid):
    """The launcher's worker processes: forks of its fork server."""
    return [pid for server in children(launcher_pid, b"forkserver") for pid in children(server, b"forkserver")]


@pytest.mark.unit
def test_a_forked_worker_takes_its_launchers_environment_not_the_servers(monkeypatch):
    """A fork server keeps the environment it started with; a worker forked from it runs
    with this launch's environment, plus what the elastic agent set for its rank."""
    server_env = {"STALE": "from an earlier launch", "RANK": "1", "LOCAL_RANK": "1", "PATH": "/old"}
    launcher_env = {"PATH": "/usr/bin", "FRESH": "this launch", "RANK": "7"}  # RANK: the agent's wins
    seen = {}
    monkeypatch.setattr(os, "environ", os.environ.copy())  # os.environ itself stays untouched
    os.environ.clear()
    os.environ.update(server_env)
    assert start_worker(lambda *args: seen.update(env=dict(os.environ), args=args) or "done",
                        launcher_env, "a", "b") == "done"
    assert seen["args"] == ("a", "b")
    assert seen["env"] == {"PATH": "/usr/bin", "FRESH": "this launch", "RANK": "1", "LOCAL_RANK": "1"}


class Ended:
    def __init__(self, pid, exitcode):
        self.pid, self.exitcode = pid, exitcode


@pytest.mark.unit
def test_a_worker_killed_as_its_peer_failed_is_named_not_the_peer():
    """The agent names the first failure it sees; a worker killed by a signal before (or as)
    a peer reported an error is the cause. One the launcher's side killed later, or one
    ended by the agent's SIGTERM, is a consequence."""
    seen = SeenWorkers()
    error_at = 1000.0
    seen.processes = {11: Ended(11, 1), 12: Ended(12, -signal.SIGKILL), 13: Ended(13, -signal.SIGKILL),
                      14: Ended(14, -signal.SIGTERM)}
    seen.gone_at = {11: error_at + 0.3, 12: error_at + 0.2, 13: error_at + SILENT_GRACE_S, 14: error_at + 0.2}
    records = {0: {"pid": 11, "error": "connection closed by peer", "waiting": True, "heartbeat": error_at},
               1: {"pid": 12, "heartbeat": error_at - 0.5},
               2: {"pid": 13, "heartbeat": error_at - 0.5},
               3: {"pid": 14, "heartbeat": error_at - 0.5}}
    assert set(seen.killed_first(records)) == {1}
    assert seen.killed_first({}) == {}


@pytest.mark.unit
def test_the_elastic_agents_signal_handlers_are_undone_after_a_launch():
    before = signal.getsignal(signal.SIGHUP)
    with agent_handlers_undone():
        signal.signal(signal.SIGHUP, lambda *_: None)  # as the agent does for SIGHUP and SIGQUIT
    assert signal.getsignal(signal.SIGHUP) is before


def train_losses(run_dir):
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


# ---------------------------------------------------------------- environment


@pytest.mark.unit
def test_detect_single_torchrun_and_slurm():
    assert detect({}).world_size == 1
    env = detect({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "9"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == (1, 1, 4, "h", 9)
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
             "SLURM_JOB_ID": "123", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    env = detect(slurm)
    assert (env.rank, env.local_rank, env.world_size, env.source) == (3, 1, 4, "slurm")
    assert env.master_addr == "gpu07" and env.master_port == 15000 + 123 * 7
    # Two steps of one job at once get different ports.
    assert detect({**slurm, "SLURM_STEP_ID": "1"}).master_port != env.master_port
    # The batch script itself (sbatch --ntasks=4, no srun) is one process, not rank 0 of 4.
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "123"}).world_size == 1
    # srun + torchrun: torchrun's variables win.
    both = detect({**slurm, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    assert (both.rank, both.world_size, both.source) == (0, 2, "torchrun")
    # A one-task SLURM allocation is a single process.
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[01-04]", "a01"), ("a[3,5-7],b1", "a3"),
                                            ("x-[10-12]-ib", "x-10-ib"), ("c1,c2", "c1")])
@pytest.mark.unit
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.unit
def test_eval_shards_cover_every_sample_once():
    x, y = torch.arange(101).float()[:, None], torch.arange(101)
    seen = [y_ for r in range(3) for _, y_ in SequentialBatches(x, y, 7, rank=r, world_size=3)]
    assert sorted(torch.cat(seen).tolist()) == list(range(101))
    tokens = np.arange(1001)
    windows = [x_[:, 0] for r in range(2) for x_, _ in SequentialWindows(tokens, 10, 4, rank=r, world_size=2)]
    assert sorted(torch.cat(windows).tolist()) == list(range(0, 1000, 10))


# ---------------------------------------------------------------- end to end


def two_ranks(strategy: str) -> tuple:
    """TINY on 2 ranks of batch 16: one process's batch 32, split."""
    return (*TINY, "data.batch_size=16", "trainer.devices=2", f"trainer.strategy={strategy}")


# The tests that read the same trained runs (trained_once) run on one xdist worker.
SHARED_RUNS = pytest.mark.xdist_group("distributed_runs")


@pytest.mark.dist
@SHARED_RUNS
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_follow_the_single_process_curve(trained_once, strategy):
    """2 ranks with per-device batch b == one process with batch 2b, step by step."""
    single = trained_once(*TINY, "data.batch_size=32")
    ddp = trained_once(*two_ranks(strategy))
    a, b = train_losses(single), train_losses(ddp)
    assert len(a) == len(b) == 20
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert y == pytest.approx(x, rel=1e-5), f"step {step}: {x} vs {y}"
    # Evaluation counts every sample once under DDP: the metrics agree too.
    assert summary(ddp)["test"]["accuracy"] == pytest.approx(summary(single)["test"]["accuracy"])
    assert not (ddp.parent / "outputs").exists()  # rank 1 made no run dir of its own
    assert (ddp / "train_rank0.log").is_file() and (ddp / "train_rank1.log").is_file()
    assert "per replica x 2 replicas" in (ddp / "train_rank0.log").read_text()  # the effective global batch


@pytest.mark.dist
def test_fsdp_sharded_checkpoint_evaluates_in_one_process(run_cli):
    trained = run_cli("train", *TINY_GPT[:-4], "trainer.strategy=fsdp", "trainer.devices=2", "trainer.max_steps=6",
                      "trainer.val_every=3", "trainer.progress=plain")
    assert trained.returncode == 0, trained.output
    shards = trained.run_dir() / "checkpoints" / "best.dcp"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} == {p.name for p in shards.iterdir()}
    # The run's own test: 4 batches on each of 2 ranks, strided, are one process's first 8.
    evaluated = run_cli("eval", f"ckpt={trained.run_dir()}", "eval_batches=8")
    assert evaluated.returncode == 0, evaluated.output
    report = json.loads((evaluated.run_dir("eval") / "eval.json").read_text())
    assert report["checkpoint"].endswith("best.dcp")
    assert report["metrics"]["loss"] == pytest.approx(trained.summary()["test"]["loss"], rel=1e-5)


@pytest.mark.dist
@SHARED_RUNS
def test_torchrun_joins_the_existing_world(trained_once, tmp_path):
    ours = trained_once(*two_ranks("ddp"))  # the run the curve test compares with one process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "bigmodel_cli", "train", *two_ranks("ddp")]
    other = tmp_path / "torchrun"
    other.mkdir()
    proc = subprocess.run(cmd, cwd=other, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dirs = list((other / "outputs").glob("*/*_train"))
    assert len(dirs) == 1, dirs  # rank 1 made no run dir of its own
    assert train_losses(dirs[0]) == pytest.approx(train_losses(ours), rel=1e-6)
    # Rank 1 logs into the shared run dir as under our launcher (its Hydra logging is off).
    rank1 = (dirs[0] / "train_rank1.log").read_text()
    assert "rank 1 of 2 (torchrun)" in rank1 and "step 20 |" in rank1


@pytest.mark.dist
def test_multirun_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bigmodel_cli", "train", "-m", "optim.lr=1e-3,1e-2", *TINY[:-4], "trainer.max_steps=5"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweeps = list((tmp_path / "outputs").glob("*/*_train_multirun"))
    assert len(sweeps) == 1 and len(list((tmp_path / "outputs").glob("*/*"))) == 1
    for job in ("0", "1"):
        assert (sweeps[0] / job / "summary.json").is_file()


# Evaluations capped at 4 batches: the built-in text's validation split is hundreds of them.
TINY_GPT = ("model=gpt", "data=text", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "data.block_size=32",
            "data.batch_size=8", "trainer.eval_batches=4", *TINY[4:])


@pytest.mark.parametrize("args, layout", [(TINY, "dp=2 x tp=1 x pp=1"), ((*TINY, "trainer.parallel.tp=2"), "dp=1 x tp=2 x pp=1"),
                                          ((*TINY_GPT, "trainer.parallel.pp=2"), "dp=1 x tp=1 x pp=2")],
                         ids=["ddp", "tp", "pp"])
@pytest.mark.e2e
def test_srun_environment_makes_one_world(tmp_path, args, layout):
    """What `srun -n2 bigmodel train` gives each task: SLURM_* variables and no RANK. The
    model splits (tp, pp) build their mesh from it as from our launcher's."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))}
    procs = []
    for rank in range(2):
        env = {**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
               "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_JOB_ID": str(40000 + os.getpid() % 1000), "SLURM_JOB_NODELIST": "127.0.0.1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "bigmodel_cli", "train", *args], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    dirs = list((tmp_path / "outputs").glob("*/*_train"))
    assert len(dirs) == 1
    assert len(train_losses(dirs[0])) == 20
    assert f"parallel layout: {layout}" in (dirs[0] / "train_rank1.log").read_text()
    assert "done in" in outputs[0][1] and "done in" not in outputs[1][1]  # console from rank 0 only


@pytest.mark.dist
def test_distributed_multirun_sweep(run_cli):
    result = run_cli("train", "-m", "optim.lr=1e-3,1e-2", "trainer.devices=2", *TINY[:-4], "trainer.max_steps=5")
    assert result.returncode == 0, result.output
    sweep = next((result.cwd / "outputs").glob("*/*_train_multirun"))
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "summary.json").is_file()


@pytest.mark.dist
def test_a_killed_worker_ends_the_job(tmp_path, background):
    proc = background([sys.executable, "-m", "bigmodel_cli", "train", "trainer.devices=2", "model=gpt",
                             "data=text", "trainer.max_steps=100000", "trainer.dist_timeout_s=30",
                             "trainer.progress=plain"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    rank_log = None
    while time.time() < deadline and rank_log is None:
        time.sleep(1)
        logs = list((tmp_path / "outputs").glob("*/*_train/train_rank1.log"))
        if logs and "step 0 | val" in logs[0].read_text():
            rank_log = logs[0]
    assert rank_log is not None, "workers never started"
    workers = worker_pids(proc.pid)
    assert len(workers) == 2, workers
    killed = rank_of(rank_log.parent, workers[-1])
    os.kill(workers[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=240)  # ends, rather than hanging
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"worker rank {killed} was killed by SIGKILL" in lines[0], err[-3000:]
    assert "Traceback" not in err


@pytest.mark.dist
def test_uneven_eval_shards_under_fsdp(run_cli):
    """81 validation samples, batch 40: rank 0 runs 2 eval batches, rank 1 only 1. FSDP's
    forward is a collective, so rank 1 must keep pace without counting anything twice."""
    trained = run_cli("train", "data=synthetic", "data.num_samples=810", "data.batch_size=40",
                      "trainer.strategy=fsdp", "trainer.devices=2", "trainer.max_steps=3",
                      "trainer.val_every=3", "trainer.progress=plain", timeout=120)
    assert trained.returncode == 0, trained.output
    records = [json.loads(l) for l in (trained.run_dir() / "metrics.jsonl").read_text().splitlines()]
    distributed_val = next(r for r in records if r["step"] == 3 and "val/loss" in r)
    evaluated = run_cli("eval", f"ckpt={trained.run_dir()}/checkpoints/last.dcp", "split=val")
    assert evaluated.returncode == 0, evaluated.output
    report = json.loads((evaluated.run_dir("eval") / "eval.json").read_text())
    assert report["metrics"]["loss"] == pytest.approx(distributed_val["val/loss"], rel=1e-5)
    assert report["metrics"]["accuracy"] == pytest.approx(distributed_val["val/accuracy"])


@pytest.mark.dist
def test_ctrl_c_stops_every_worker(tmp_path, background):
    proc = background([sys.executable, "-m", "bigmodel_cli", "train", "trainer.devices=2", "model=gpt",
                             "data=text", "trainer.max_steps=100000", "trainer.progress=plain"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(worker_pids(proc.pid)) < 2:
        time.sleep(0.5)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    _, err = proc.communicate(timeout=60)
    # In training: the step finishes, a checkpoint is written, exit 75. Still starting: 130.
    assert proc.returncode in (75, 130), err[-2000:]
    assert ("stopped: SIGINT" in err and "Traceback" not in err) if proc.returncode == 75 else "interrupted" in err
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


@pytest.mark.slurm
@pytest.mark.skipif(not slurm_is_up(), reason="no running Slurm (scripts/local_slurm.sh starts one)")
def test_real_srun_matches_our_launcher(run_cli, tmp_path):
    ours = run_cli("train", *TINY, "trainer.devices=2")
    assert ours.returncode == 0, ours.output
    where = fresh_dir(tmp_path / "slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))}
    proc = subprocess.run(["srun", "-n2", sys.executable, "-m", "bigmodel_cli", "train", *TINY], cwd=where,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dirs = list((where / "outputs").glob("*/*_train"))
    assert len(dirs) == 1
    assert train_losses(dirs[0]) == pytest.approx(train_losses(ours.run_dir()), rel=1e-6)


@pytest.mark.dist
def test_a_stalled_collective_times_out(run_cli):
    """Rank 1 stops answering; rank 0's collective gives up after trainer.dist_timeout_s and
    the whole job ends, instead of hanging."""
    helpers = str(Path(__file__).parent / "helpers")
    result = run_cli("train", "model=custom", "model._target_=stalling_model.StallOnRank1",
                     "trainer.devices=2", "trainer.dist_timeout_s=5", "trainer.max_steps=20",
                     "trainer.val_at_start=false", "trainer.progress=plain",
                     env={"PYTHONPATH": helpers + os.pathsep + os.environ.get("PYTHONPATH", "")}, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "worker rank 1 stopped responding: it was stuck" in lines[0], result.stderr[-3000:]
    assert "rank 0 gave up waiting for it after trainer.dist_timeout_s=5 s" in lines[0]
    assert "Traceback" not in result.stderr


def rank_of(run_dir: Path, pid: int) -> int:
    """The rank of a worker process, from the line each rank logs at start."""
    for log in run_dir.glob("train_rank*.log"):
        match = re.search(r"rank (\d+) of \d+ \(\w+\), pid (\d+)", log.read_text())
        if match and int(match.group(2)) == pid:
            return int(match.group(1))
    raise AssertionError(f"no rank log names pid {pid}")


def start_two_workers(background, tmp_path, *args):
    """`bigmodel train trainer.devices=2` in the background, once both workers train."""
    proc = background([sys.executable, "-m", "bigmodel_cli", "train", "trainer.devices=2", *TINY[:-4],
                             "trainer.max_steps=100000", "trainer.val_every=200", "trainer.log_every=10",
                             "hydra.run.dir=run", *args],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "err.txt", "w"))
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
        metrics = tmp_path / "run" / "metrics.jsonl"
        if metrics.exists() and '"step": 20,' in metrics.read_text():
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the workers never started training")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.dist
def test_kill_9_of_the_launcher_leaves_no_worker_behind(tmp_path, background):
    """The workers notice within seconds, checkpoint and stop as on SIGTERM, and are gone
    within trainer.dist_timeout_s at most."""
    proc = start_two_workers(background, tmp_path, "trainer.dist_timeout_s=20")
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    helpers = server_pids(proc.pid)  # the fork server, a resource tracker
    assert helpers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20 + 60  # dist_timeout_s, and a wide margin for a loaded machine
    while time.time() < deadline and any(alive(pid) for pid in workers + helpers):
        time.sleep(0.5)
    assert not any(alive(pid) for pid in workers + helpers), "a worker or helper outlived its launcher"
    # They stopped as on a signal: a checkpoint at the step they stopped, besides the
    # validation checkpoints every 200 steps.
    steps = [int(p.name[5:13]) for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt")]
    assert any(step % 200 for step in steps), steps


@pytest.mark.dist
def test_sigterm_to_the_whole_process_group_checkpoints_and_stops(tmp_path, background):
    """What scancel, a preemption or `kill -TERM -PGID` does: SIGTERM reaches the launcher,
    its fork server and every rank at once. The server outlives it (or the agent would read
    exit code 255 for ranks still writing their checkpoint): the ranks checkpoint, and the
    launcher reports the stop."""
    proc = start_two_workers(background, tmp_path, "trainer.dist_timeout_s=30")
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=240)
    assert not any(alive(pid) for pid in workers), "the launcher ended before its ranks"
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 75, err[-3000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("stopped: SIGTERM") and "before writing" not in last, err[-3000:]
    steps = [int(p.name[5:13]) for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt")]
    assert any(step % 200 for step in steps), steps


@pytest.mark.dist
def test_a_stopped_rank_is_named(tmp_path, background):
    """SIGSTOP freezes rank 1: rank 0's collective times out, and the line names rank 1."""
    proc = start_two_workers(background, tmp_path, "trainer.dist_timeout_s=5")
    workers = worker_pids(proc.pid)
    frozen = next(pid for pid in workers if rank_of(tmp_path / "run", pid) == 1)
    os.kill(frozen, signal.SIGSTOP)
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "worker rank 1 stopped responding: it was frozen or stopped" in lines[0], err[-3000:]
    assert "Traceback" not in err


@pytest.mark.dist
def test_sigterm_while_the_workers_start_names_the_signal(tmp_path, background):
    proc = background([sys.executable, "-m", "bigmodel_cli", "train", "trainer.devices=2", *TINY,
                             "hydra.run.dir=run"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(worker_pids(proc.pid)) < 2:
        time.sleep(0.05)
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "too late: already training"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("stopped: SIGTERM"), err[-3000:]
    assert "Ctrl-C" not in err and "Traceback" not in err


@pytest.mark.dist
def test_a_worker_that_raises_is_one_line(run_cli):
    """An unexpected error on one rank: one line naming it, the traceback in its rank log."""
    helpers = str(Path(__file__).parent / "helpers")
    result = run_cli("train", "model=custom", "model._target_=flaky_model.NonFiniteAt", "+model.at=-1",
                     "+model.raise_at=4", "trainer.devices=2", "trainer.device=cpu", "trainer.dist_timeout_s=20",
                     "trainer.max_steps=20", "trainer.progress=plain", "hydra.run.dir=run",
                     env={"PYTHONPATH": helpers + os.pathsep + os.environ.get("PYTHONPATH", "")}, timeout=300)
    assert result.returncode == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(r"worker rank \d failed: ZeroDivisionError: raised on purpose", lines[0])
    assert "Traceback" not in result.stderr
    assert "Traceback" in (result.cwd / "run" / "train_rank0.log").read_text()


@pytest.mark.unit
def test_two_ranks_on_one_gpu_are_found():
    from bigmodel_cli.engine.distributed import first_shared_gpu

    assert first_shared_gpu([("a", "GPU-0"), ("a", "GPU-1"), ("b", "GPU-0")]) is None
    assert first_shared_gpu([("a", "GPU-0"), ("a", "GPU-1"), ("a", "GPU-0")]) == (0, 2, "a")


@pytest.mark.unit
def test_the_failure_line_names_the_cause_not_its_victims():
    from types import SimpleNamespace

    from bigmodel_cli.engine.worker_link import WAITING, explain_failure

    now = 1000.0
    waiting = {"error": "RuntimeError: Connection closed by peer", "waiting": True, "heartbeat": now}
    failed = {0: SimpleNamespace(exitcode=1)}
    # A rank's own error wins over the ranks that only waited for it.
    records = {0: waiting, 1: {"error": "UserError-like reason", "waiting": False, "heartbeat": now}}
    assert explain_failure(failed, records, 30, now) == "worker rank 1 failed: UserError-like reason"
    # A rank killed by a signal.
    killed = {0: SimpleNamespace(exitcode=1), 1: SimpleNamespace(exitcode=-9)}
    assert explain_failure(killed, {0: waiting, 1: {"heartbeat": now}}, 30, now).startswith(
        "worker rank 1 was killed by SIGKILL")
    # A rank that went silent (stopped) or stayed alive without taking part (stuck).
    assert "rank 1 stopped responding: it was frozen or stopped (no sign of life for 40 s)" in explain_failure(
        failed, {0: waiting, 1: {"heartbeat": now - 40}}, 30, now)
    assert "rank 1 stopped responding: it was stuck" in explain_failure(failed, {0: waiting, 1: {"heartbeat": now}},
                                                                       30, now)
    assert WAITING.search("Timed out waiting 5000ms for recv operation to complete")

"""trainer.threads: torch's intra-op threads sized by the CPUs this process may use
(affinity, cgroup quota, SLURM_CPUS_PER_TASK), shared among the ranks on the machine."""

import os
import shutil
import subprocess
import sys

import pytest

from bigmodel_cli.config_checks import validate_train_config
from bigmodel_cli.engine import threads
from bigmodel_cli.engine.distributed import DistEnv
from bigmodel_cli.engine.threads import (
    LAUNCHER_OMP,
    cgroup_quota,
    local_ranks,
    plan_threads,
    threads_per_rank,
    usable_cpus,
)
from bigmodel_cli.errors import UserError



def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """An 8-core machine with no affinity mask and no cgroup quota; returns a setter."""
    def set_cpus(cores=8, affinity=None):
        monkeypatch.setattr(threads.os, "cpu_count", lambda: cores)
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(affinity or cores)),
                            raising=False)

    set_cpus()
    monkeypatch.setattr(threads, "CGROUP_ROOT", tmp_path / "no-cgroup")
    monkeypatch.setattr(threads, "PROC_CGROUP", tmp_path / "no-proc-cgroup")
    monkeypatch.setattr(threads, "PROC_STAT", tmp_path / "no-proc-stat")  # idle CPUs: unknown
    return set_cpus


# ---------------------------------------------------------------- cgroup quotas


@pytest.mark.parametrize("cpu_max,expected", [("150000 100000\n", 1.5), ("max 100000\n", None),
                                               ("200000 100000", 2.0), ("garbage", None)])
@pytest.mark.unit
def test_cgroup_v2_cpu_max_at_the_root(tmp_path, cpu_max, expected):
    write(tmp_path / "cg" / "cpu.max", cpu_max)
    assert cgroup_quota(tmp_path / "cg", tmp_path / "missing") == expected


@pytest.mark.unit
def test_cgroup_v2_own_path_and_its_parents_tightest_wins(tmp_path):
    root = tmp_path / "cg"
    write(root / "user.slice" / "cpu.max", "100000 100000")  # 1 CPU for the whole slice
    write(root / "user.slice" / "session-3.scope" / "cpu.max", "max 100000")
    write(root / "other.slice" / "cpu.max", "50000 100000")  # not ours
    proc = write(tmp_path / "proc-cgroup", "0::/user.slice/session-3.scope\n")
    assert cgroup_quota(root, proc) == 1.0


@pytest.mark.unit
def test_cgroup_path_outside_the_root_falls_back_to_the_root_files(tmp_path):
    root = tmp_path / "cg"
    write(root / "cpu.max", "300000 100000")
    proc = write(tmp_path / "proc-cgroup", "0::/../../elsewhere\n")
    assert cgroup_quota(root, proc) == 3.0
    proc.write_text("0::/docker/abc\n")  # a path this namespace does not show: the root's files
    assert cgroup_quota(root, proc) == 3.0


@pytest.mark.unit
def test_cgroup_v1_cfs_quota(tmp_path):
    root = tmp_path / "cg"
    write(root / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "250000\n")
    write(root / "cpu,cpuacct" / "job" / "cpu.cfs_period_us", "100000\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    write(root / "cpuset" / "cpu.cfs_quota_us", "100000\n")  # not the cpu controller
    write(root / "cpuset" / "cpu.cfs_period_us", "100000\n")
    proc = write(tmp_path / "proc-cgroup", "4:memory:/x\n3:cpu,cpuacct:/job\n0::/\n")
    assert cgroup_quota(root, proc) == 2.5
    proc.write_text("3:cpu,cpuacct:/\n")
    assert cgroup_quota(root, proc) is None  # -1: no quota


@pytest.mark.unit
def test_quota_rounds_up_and_limits_usable_cpus(machine, tmp_path):
    root = write(tmp_path / "cg" / "cpu.max", "150000 100000").parent
    usable = usable_cpus({}, root, tmp_path / "missing")
    assert usable[:2] == (2, "cgroup CPU quota 1.5")
    write(root / "cpu.max", "10000 100000")  # a tenth of a CPU is still one thread
    assert usable_cpus({}, root, tmp_path / "missing").count == 1


# ------------------------------------------------------- affinity and Slurm


@pytest.mark.unit
def test_affinity_limits_usable_cpus(machine):
    assert usable_cpus({})[:2] == (8, "all 8 cores")
    machine(cores=8, affinity=3)
    assert usable_cpus({})[:2] == (3, "affinity 3 of 8 cores")


@pytest.mark.unit
def test_affinity_missing_falls_back_to_cpu_count(machine, monkeypatch):
    monkeypatch.delattr(threads.os, "sched_getaffinity")
    assert usable_cpus({}).count == 8


@pytest.mark.parametrize("value,expected", [("2", (2, "SLURM_CPUS_PER_TASK=2")), ("16", (8, "all 8 cores")),
                                            ("0", (8, "all 8 cores")), ("x", (8, "all 8 cores"))])
@pytest.mark.unit
def test_slurm_cpus_per_task(machine, value, expected):
    assert usable_cpus({"SLURM_CPUS_PER_TASK": value})[:2] == expected


@pytest.mark.unit
def test_every_limit_that_ties_is_named(machine):
    machine(cores=8, affinity=2)
    assert usable_cpus({"SLURM_CPUS_PER_TASK": "2"}).reason == "affinity 2 of 8 cores, SLURM_CPUS_PER_TASK=2"


# ------------------------------------------------------------ ranks and plan


@pytest.mark.unit
def test_local_ranks():
    assert local_ranks(None, {}) == 1
    assert local_ranks(DistEnv(), {"SLURM_NTASKS_PER_NODE": "4"}) == 1  # a batch script: one process
    assert local_ranks(DistEnv(world_size=4, source="torchrun"), {"LOCAL_WORLD_SIZE": "2"}) == 2
    srun = DistEnv(world_size=8, source="slurm")
    assert local_ranks(srun, {"SLURM_NTASKS_PER_NODE": "4"}) == 4
    assert local_ranks(srun, {"SLURM_STEP_NUM_NODES": "2"}) == 4
    assert local_ranks(srun, {}) == 8


@pytest.mark.unit
def test_auto_splits_usable_cpus_across_local_ranks(machine):
    assert threads_per_rank("auto", 1) == 8
    assert threads_per_rank("auto", 3) == 2
    assert threads_per_rank("auto", 16) == 1  # never 0
    assert threads_per_rank("3", 4) == 3  # explicit: as given
    plan = plan_threads("auto", DistEnv(world_size=2, source="torchrun"), {"LOCAL_WORLD_SIZE": "2"})
    assert plan == (4, "8 usable CPUs: all 8 cores; 2 local ranks")


@pytest.mark.unit
def test_auto_respects_the_users_omp_num_threads_but_not_the_launchers(machine):
    plan = plan_threads("auto", None, {"OMP_NUM_THREADS": "3"})
    assert plan.per_rank == 3 and "OMP_NUM_THREADS=3, set before the start, wins over auto's 8" in plan.why
    assert plan_threads("5", None, {"OMP_NUM_THREADS": "3"}).per_rank == 5  # an explicit setting wins
    ours = {"OMP_NUM_THREADS": "3", LAUNCHER_OMP: "3", "LOCAL_WORLD_SIZE": "2"}
    assert plan_threads("auto", None, ours).per_rank == 3 and "launcher" in plan_threads("auto", None, ours).why
    # torchrun's own OMP_NUM_THREADS=1 for its workers is not the user's choice
    torchrun = {"OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}
    assert plan_threads("auto", None, torchrun) == (4, "8 usable CPUs: all 8 cores; 2 local ranks")


@pytest.mark.unit
def test_a_slurm_tasks_own_cpus_are_not_shared_again(machine):
    env = DistEnv(world_size=4, source="slurm")
    plan = plan_threads("auto", env, {"SLURM_CPUS_PER_TASK": "2", "SLURM_NTASKS_PER_NODE": "4"})
    assert plan.per_rank == 2, plan


@pytest.mark.unit
def test_auto_counts_only_the_cpus_other_work_leaves_idle(machine, tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    ticks = iter([(100, 0), (150, 100)])  # (idle, busy) per CPU: half idle over the sample

    def fake_times(path):
        idle, busy = next(ticks)
        return {f"cpu{n}": (idle, idle + busy) for n in range(8)}

    monkeypatch.setattr(threads, "cpu_times", fake_times)
    assert threads.idle_cpus(sample_s=0, stat=stat) == pytest.approx(8 * 0.5 / 1.5)
    usable = threads.usable_cpus({}, idle=2.4)
    assert usable.count == 2 and "idle" in usable.reason


@pytest.mark.unit
def test_launcher_shares_usable_cpus_among_workers(machine, monkeypatch):
    from bigmodel_cli.engine.launch import share_cpus

    machine(cores=8, affinity=4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(LAUNCHER_OMP, raising=False)
    share_cpus(2)
    assert os.environ["OMP_NUM_THREADS"] == "2" == os.environ[LAUNCHER_OMP]
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's: kept
    share_cpus(2)
    assert os.environ["OMP_NUM_THREADS"] == "7"


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "-2", "x", "1.5", ""])
def test_bad_settings_are_refused_in_one_line(compose, value):
    with pytest.raises(UserError, match=rf"^trainer.threads must be auto or a positive integer, got '{value}'$"):
        validate_train_config(compose(f"trainer.threads='{value}'"))


@pytest.mark.unit
def test_good_settings_validate(compose):
    for value in ("auto", "1", "12"):
        validate_train_config(compose(f"trainer.threads={value}"))


# --------------------------------------------------------------- end to end

QUICK = ("trainer.max_steps=2", "trainer.val_every=2", "trainer.eval_batches=2", "trainer.val_at_start=false",
         "trainer.progress=plain", "logger=[jsonl]", "trainer.save_checkpoints=false")


def train(tmp_path, prefix=(), **env):
    """`bigmodel train` in tmp_path as one plain process: no launcher, srun or thread variables
    inherited from the shell that runs the tests."""
    dropped = ("OMP_NUM_THREADS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", LAUNCHER_OMP)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in dropped}
    proc = subprocess.run([*prefix, sys.executable, "-m", "bigmodel_cli", "train", *QUICK], cwd=tmp_path, check=False,
                          env={**clean, "PYTHONUNBUFFERED": "1", **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stderr


@pytest.mark.e2e
@pytest.mark.skipif(not shutil.which("taskset"), reason="taskset (util-linux) is not installed")
def test_one_thread_under_taskset_one_cpu(tmp_path):
    log = train(tmp_path, prefix=("taskset", "-c", "0"))
    assert "threads: 1 per rank (1 usable CPU: affinity 1 of" in log


@pytest.mark.e2e
def test_one_thread_with_slurm_cpus_per_task_one(tmp_path):
    log = train(tmp_path, SLURM_CPUS_PER_TASK="1")
    assert "threads: 1 per rank (1 usable CPU:" in log and "SLURM_CPUS_PER_TASK=1" in log

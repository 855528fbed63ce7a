"""How many CPU threads each rank computes with (trainer.threads); no torch here.

torch starts one intra-op thread per core of the machine, whatever share of it this
process may use: under taskset, a cgroup CPU quota (containers, systemd) or a Slurm
task's CPUs, or beside other busy processes on a shared login node, threads that
outnumber the usable CPUs wait on each other at every operation (30x slower per step
for a small MLP on a busy 2-core machine). `auto` splits the CPUs this process may use
among the ranks on this machine, counting only the CPUs that other work leaves idle at
the start (measured for 0.1 s from /proc/stat).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from bigmodel_cli.errors import UserError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
PROC_STAT = Path("/proc/stat")
# How long `auto` watches the CPUs at start to see how many other work keeps busy.
IDLE_SAMPLE_S = 0.1
# What our launcher set OMP_NUM_THREADS to for its workers: not the user's choice.
LAUNCHER_OMP = "BIGMODEL_LAUNCHER_OMP_NUM_THREADS"


class UsableCpus(NamedTuple):
    count: int
    reason: str  # what limited the count, for the log: "affinity 1 of 2 cores"
    per_task: bool = False  # the limit is this task's own (SLURM_CPUS_PER_TASK): not to be shared


class ThreadPlan(NamedTuple):
    per_rank: int
    why: str  # "1 usable CPU: affinity 1 of 2 cores; 1 local rank"


def parse_threads(setting: object, key: str = "trainer.threads") -> int | None:
    """None for auto, else the positive thread count `setting` names."""
    text = str(setting).strip().lower()
    if text == "auto":
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UserError(f"{key} must be auto or a positive integer, got {str(setting)!r}")
    return int(text)


def positive_int(value: str | None) -> int | None:
    """An environment variable's positive integer; None when unset or anything else.
    (OMP_NUM_THREADS may list one count per nesting level, "4,2": the first is ours.)"""
    first = (value or "").split(",")[0].strip()
    return int(first) if first.isascii() and first.isdigit() and int(first) > 0 else None


def own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """Controller -> this process's cgroup path, from /proc/self/cgroup ("" for cgroup v2)."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                found[controller] = parts[2]
    return found


def folders_up(base: Path, path: str) -> list:
    """base/path and the folders above it up to base, those that exist: a quota on any of
    them limits this process. Just base when the path is unknown or points outside it
    (a cgroup namespace shows paths relative to another root)."""
    rel = Path(path.strip("/"))
    if ".." in rel.parts:
        return [base]
    return [folder for folder in (base / rel, *(base / p for p in rel.parents)) if folder.is_dir()] or [base]


def read_quota(folder: Path) -> float | None:
    """CPUs a cgroup folder's quota allows (quota / period): cpu.max (v2, "quota period" or
    "max period"), else cpu.cfs_quota_us / cpu.cfs_period_us (v1, -1: none). None: no limit."""
    try:
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text(encoding="utf-8").split()[:2]
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text(encoding="utf-8").strip()
            period = (folder / "cpu.cfs_period_us").read_text(encoding="utf-8").strip()
        allowed, per = int(quota), int(period)
    except (OSError, ValueError):  # no such files, or "max" / garbage: no limit we can read
        return None
    return allowed / per if allowed > 0 and per > 0 else None


def cgroup_quota(root: Path | None = None, proc_cgroup: Path | None = None) -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors: cgroup v2 under
    `root`, v1 under its cpu controller's folder (root/cpu, root/cpu,cpuacct). None: none."""
    root = root or CGROUP_ROOT
    own = own_cgroups(proc_cgroup or PROC_CGROUP)
    folders = folders_up(root, own.get("", ""))
    if root.is_dir():
        for mount in sorted(root.iterdir()):
            if "cpu" in mount.name.split(",") and mount.is_dir():
                folders += folders_up(mount, own.get("cpu", ""))
    quotas = [q for q in map(read_quota, folders) if q is not None]
    return min(quotas, default=None)


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def cpu_times(stat: Path = PROC_STAT) -> dict[str, tuple[int, int]]:
    """cpuN -> (idle ticks, all ticks) from /proc/stat; {} where there is none."""
    try:
        lines = stat.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    times = {}
    for line in lines:
        name, *fields = line.split() or [""]
        ticks = [int(f) for f in fields[:8] if f.isdigit()]
        if name.startswith("cpu") and name[3:].isdigit() and len(ticks) >= 5:
            times[name] = (ticks[3] + ticks[4], sum(ticks))  # idle + iowait
    return times


def idle_cpus(sample_s: float = IDLE_SAMPLE_S, stat: Path | None = None) -> float | None:
    """How many of this process's CPUs other work leaves idle, measured over `sample_s`
    (this process sleeps meanwhile); None where /proc/stat cannot tell."""
    stat = stat or PROC_STAT
    try:
        allowed = {f"cpu{n}" for n in os.sched_getaffinity(0)}
    except (AttributeError, OSError):
        return None
    before = cpu_times(stat)
    if not before:
        return None
    time.sleep(sample_s)
    after = cpu_times(stat)
    shares = [(after[c][0] - before[c][0]) / (after[c][1] - before[c][1])
              for c in allowed if c in before and c in after and after[c][1] > before[c][1]]
    return sum(shares) if shares else None


def usable_cpus(environ: Mapping[str, str] = os.environ, cgroup_root: Path | None = None,
                proc_cgroup: Path | None = None, idle: float | None = None) -> UsableCpus:
    """The CPUs this process may actually use: the fewest of its affinity mask, its cgroup
    quota (rounded up), SLURM_CPUS_PER_TASK and, when measured (`idle`), those of them that
    other processes leave idle (a busy shared login node); and what limited it."""
    cores = os.cpu_count() or 1
    affinity = affinity_cpus()
    limits = {(f"affinity {affinity} of {cores} cores" if affinity < cores else f"all {cores} cores"): affinity}
    if idle is not None:
        limits[f"{idle:.1f} of them idle, the rest busy with other work"] = max(1, round(idle))
    quota = cgroup_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        limits[f"cgroup CPU quota {quota:g}"] = max(1, math.ceil(quota))
    slurm = positive_int(environ.get("SLURM_CPUS_PER_TASK"))
    if slurm is not None:
        limits[f"SLURM_CPUS_PER_TASK={slurm}"] = slurm
    count = min(limits.values())
    limited_by = [name for name, value in limits.items() if value == count]
    return UsableCpus(count, ", ".join(limited_by), per_task=slurm is not None and slurm == count)


def local_ranks(env=None, environ: Mapping[str, str] = os.environ) -> int:
    """Ranks of this run on this machine, which share its CPUs: LOCAL_WORLD_SIZE (torchrun,
    our launcher), else for an srun step (`env`, a distributed.DistEnv) its tasks per node,
    else 1. A batch script's SLURM_NTASKS* describe the job, not this single process."""
    found = positive_int(environ.get("LOCAL_WORLD_SIZE"))
    if found is not None:
        return found
    if env is not None and env.source == "slurm":
        per_node = positive_int(environ.get("SLURM_NTASKS_PER_NODE"))
        nodes = positive_int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES")) or 1
        return per_node or max(1, math.ceil(env.world_size / nodes))
    return 1


def threads_per_rank(setting: object, ranks: int, usable: UsableCpus | None = None) -> int:
    """trainer.threads for one of `ranks` ranks on this machine: auto shares the usable CPUs."""
    explicit = parse_threads(setting)
    if explicit is not None:
        return explicit
    usable = usable or usable_cpus()
    return max(1, usable.count // (1 if usable.per_task else max(1, ranks)))


def plan_threads(setting: object, env=None, environ: Mapping[str, str] = os.environ) -> ThreadPlan:
    """Threads for this rank and why. With trainer.threads=auto an OMP_NUM_THREADS the user
    set before the start wins (our launcher's own value does not count as the user's)."""
    explicit = parse_threads(setting)
    if explicit is not None:
        return ThreadPlan(explicit, f"trainer.threads={explicit}")
    omp = environ.get("OMP_NUM_THREADS")
    launched = positive_int(environ.get(LAUNCHER_OMP))
    if launched is not None and omp == environ.get(LAUNCHER_OMP) and "LOCAL_WORLD_SIZE" in environ:
        return ThreadPlan(launched, "auto: the launcher's share of the idle usable CPUs for each local rank")
    usable, ranks = usable_cpus(environ, idle=idle_cpus()), local_ranks(env, environ)
    cpus = f"{usable.count} usable CPU{'s' if usable.count != 1 else ''}: {usable.reason}"
    shared = f"{cpus}; {ranks} local rank{'s' if ranks != 1 else ''}"
    # torchrun sets OMP_NUM_THREADS=1 for its workers when it starts several: not the user's.
    by_torchrun = omp == "1" and "TORCHELASTIC_RUN_ID" in environ
    if positive_int(omp) is not None and omp != environ.get(LAUNCHER_OMP) and not by_torchrun:
        auto = threads_per_rank("auto", ranks, usable)
        return ThreadPlan(positive_int(omp), f"OMP_NUM_THREADS={omp}, set before the start, wins over auto's {auto}; "
                                             f"{shared}")
    return ThreadPlan(threads_per_rank("auto", ranks, usable), shared)

"""trainer.threads on a busy machine: torch's thread count against other CPU-bound work.

    python bench/threads.py [--reps 3] [--steps 200] [--log-every 20] [--busy 2]

Starts --busy CPU-bound Python loops (the other users of a shared login node), then runs
`bigmodel train` of the default MLP on digits for --steps steps with trainer.threads=auto,
=1 and =<os.cpu_count()> (torch's own default: one thread per core), interleaved
A B C A B C ... Step time is `step_ms` from metrics.jsonl, the median over the log intervals
with the first left out. Prints the medians, their ratios to auto, and a markdown block
to paste into bench/RESULTS.md. The busy loops are killed at the end, whatever happens.

auto counts the CPUs this process may use (affinity, cgroup quota, SLURM_CPUS_PER_TASK)
that other work leaves idle at its start; the "threads" column shows what it chose.
`--busy 0` measures the same on a quiet machine, where auto should match the default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bigmodel_cli.engine.threads import LAUNCHER_OMP, usable_cpus

COMMON = ["trainer.val_at_start=false", "trainer.eval_batches=2", "trainer.progress=plain", "logger=[jsonl]",
          "trainer.save_checkpoints=false"]
# The settings compare themselves only: no thread count inherited from the shell.
ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", LAUNCHER_OMP)}


def variants() -> dict:
    """Label -> trainer.threads."""
    cores = os.cpu_count() or 1
    return {"auto": "auto", "1": "1", f"{cores} (torch's default)": str(cores)}


def start_busy(count: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_busy(procs: list) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def run_bigmodel(threads: str, steps: int, log_every: int, workdir: Path) -> dict:
    """One run: median ms/step (first interval left out) and the threads it reported."""
    run_dir = workdir / f"threads-{threads}-{time.time_ns()}"
    args = [*COMMON, f"trainer.threads={threads}", f"trainer.max_steps={steps}", f"trainer.val_every={steps}",
            f"trainer.log_every={log_every}", f"hydra.run.dir={run_dir}"]
    subprocess.run([sys.executable, "-m", "bigmodel_cli", "train", *args], check=True, capture_output=True,
                   text=True, cwd=workdir, env=ENV)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_ms = [r["step_ms"] for r in records if "step_ms" in r]
    used = re.search(r"threads: (\d+) per rank", (run_dir / "train.log").read_text())
    return {"step_ms": statistics.median(step_ms[1:] or step_ms), "threads": int(used.group(1)) if used else None}


def measure(reps: int, steps: int, log_every: int) -> dict:
    """Label -> list of run results, the variants interleaved."""
    results = {label: [] for label in variants()}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for label, threads in variants().items():
                got = run_bigmodel(threads, steps, log_every, Path(tmp))
                results[label].append(got)
                print(f"rep {rep + 1} threads={label}: {json.dumps(got)}", file=sys.stderr, flush=True)
    return results


def report(results: dict, args) -> None:
    import torch

    usable = usable_cpus(ENV)
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    auto = statistics.median(r["step_ms"] for r in results["auto"])
    print(f"\n{started}, {os.cpu_count()} CPUs ({usable.count} usable: {usable.reason}), torch {torch.__version__}, "
          f"{args.busy} busy processes beside it, median of {args.reps} interleaved runs of {args.steps} steps "
          f"(`python bench/threads.py --reps {args.reps} --steps {args.steps} --log-every {args.log_every} "
          f"--busy {args.busy}`)\n")
    print("| trainer.threads | threads | ms/step | vs auto | per-pair ratio vs auto |")
    print("| --- | --- | --- | --- | --- |")
    for label, runs in results.items():
        median = statistics.median(r["step_ms"] for r in runs)
        pairs = statistics.median(r["step_ms"] / a["step_ms"] for r, a in zip(runs, results["auto"]))
        used = sorted({r["threads"] for r in runs if r["threads"] is not None})
        print(f"| {label} | {', '.join(map(str, used))} | {median:.2f} | {median / auto:.2f} | {pairs:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--busy", type=int, default=2, help="CPU-bound processes running beside each run")
    args = parser.parse_args()
    if args.steps < 2 * args.log_every:
        sys.exit("--steps must be at least twice --log-every (the first interval is left out)")
    busy = start_busy(args.busy)
    try:
        results = measure(args.reps, args.steps, args.log_every)
    finally:
        stop_busy(busy)
    report(results, args)


if __name__ == "__main__":
    main()

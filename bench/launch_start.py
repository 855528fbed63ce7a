"""What a multi-rank launch costs, before against after: `bigmodel train trainer.devices=N`
on a tiny MLP (20 steps, CPU, gloo), from two checkouts of bigmodel, interleaved A B A B.

    python bench/launch_start.py --before ../old-checkout --after . --pairs 4

CPU seconds count every process of the launch: the launcher, its workers, and a fork server
that outlives the launcher by a moment (this process becomes their subreaper, so orphans
are reaped here and their CPU counted). Prints each pair and the medians and the median of
the per-pair ratios (after / before).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
TRAIN = ("train", "data=synthetic", "data.num_samples=800", "model.hidden_sizes=[32]", "trainer.max_steps=20",
         "trainer.progress=plain", "trainer.device=cpu", "trainer.log_every=10")


def reap_all() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def one_launch(checkout: Path, devices: int) -> tuple:
    """(CPU seconds, wall seconds) of one launch from `checkout`."""
    env = dict(os.environ, PYTHONPATH=str(checkout.resolve()))
    with tempfile.TemporaryDirectory() as where:
        before, start = os.times(), time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "bigmodel_cli", *TRAIN, f"trainer.devices={devices}"],
                              cwd=where, env=env, capture_output=True, text=True)
        reap_all()
        wall, after = time.perf_counter() - start, os.times()
    if done.returncode:
        raise SystemExit(f"the launch from {checkout} failed:\n{done.stderr[-2000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of bigmodel (A)")
    parser.add_argument("--after", type=Path, default=Path("."), help="another checkout (B), default: this one")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
    rows = []
    for pair in range(args.pairs):
        a, b = one_launch(args.before, args.devices), one_launch(args.after, args.devices)
        rows.append((a, b))
        print(f"pair {pair + 1}: before cpu {a[0]:.1f} s wall {a[1]:.1f} s | after cpu {b[0]:.1f} s wall {b[1]:.1f} s")
    for index, name in ((0, "cpu"), (1, "wall")):
        before = statistics.median(a[index] for a, _ in rows)
        after = statistics.median(b[index] for _, b in rows)
        ratio = statistics.median(b[index] / a[index] for a, b in rows)
        print(f"{name}: before {before:.1f} s, after {after:.1f} s, median per-pair ratio after/before {ratio:.2f}")


if __name__ == "__main__":
    main()

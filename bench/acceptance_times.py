"""How long the default-settings accuracy runs of tests/test_acceptance.py take here.

    python bench/acceptance_times.py [--load N]

The tests assert accuracy only (a loaded machine is slower, not wrong); this measures the
wall time of each, from launch to exit, as a user waits for it. `--load N` runs N busy
processes alongside, as on a shared machine, to show how the times stretch. Prints a
markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "mlp (the README's first command)": (),
    "cnn": ("model=cnn",),
    "rnn": ("model=rnn",),
    "transformer-adam": ("model=transformer", "optim=adam"),
    "gpt on text": ("model=gpt", "data=text"),
}


def busy() -> None:
    while True:
        pass


def run(args) -> tuple:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "bigmodel_cli", "train", *args, "trainer.progress=plain",
                               "hydra.run.dir=run"], cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            return wall, f"failed: {done.stderr.strip().splitlines()[-1:]}"
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        test = summary["test"]
        shown = f"accuracy {test['accuracy']:.4f}" if "accuracy" in test else f"best val/loss {summary['best_value']:.3f}"
        return wall, shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=int, default=0, help="busy processes to run alongside")
    args = parser.parse_args()
    hogs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.load)]
    for hog in hogs:
        hog.start()
    try:
        print(f"| run | wall time (s), {args.load} busy processes alongside | result |")
        print("| --- | --- | --- |")
        for name, overrides in RUNS.items():
            wall, shown = run(overrides)
            print(f"| {name} | {wall:.0f} | {shown} |", flush=True)
    finally:
        for hog in hogs:
            hog.terminate()


if __name__ == "__main__":
    main()

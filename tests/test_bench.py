"""The benchmark script keeps working (a tiny run; the real figures are in bench/RESULTS.md)."""

import pytest
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def test_bench_script_runs_both_sides_and_prints_ratios():
    done = subprocess.run([sys.executable, str(BENCH), "--reps", "1", "--steps", "120", "--cases", "mlp"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| mlp | steps/s"))
    bigmodel, raw, ratio = (cell.strip() for cell in row.strip("|").split("|")[2:5])
    assert float(bigmodel.replace(",", "")) > 0 and float(raw.replace(",", "")) > 0 and float(ratio) > 0

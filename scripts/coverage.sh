#!/usr/bin/env bash
# Line and branch coverage of bigmodel_cli/ by the test suite, child processes included
# (launched workers, torchrun ranks, CLI subprocesses): coverage's process_startup hook in
# every Python process of the venv, parallel data files, combined at the end.
#   bash scripts/coverage.sh                 # the README's test command (pytest, its default tiers)
#   bash scripts/coverage.sh -m ""           # every tier (accuracy, compile and slurm too)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=$(mktemp -d)
cat > "$out/coveragerc" <<RC
[run]
branch = True
parallel = True
source = bigmodel_cli
data_file = $out/.coverage
[report]
precision = 1
RC
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
hook="$site/bigmodel-coverage-hook.pth"
echo "import coverage; coverage.process_startup()" > "$hook"
trap 'rm -f "$hook"' EXIT
status=0
# Tracing slows every test down: the suite's CPU budget (tests/tiers.py) is off here.
COVERAGE_PROCESS_START="$out/coveragerc" BIGMODEL_TEST_CPU_BUDGET_S=0 "$py" -m pytest -p no:cacheprovider "$@" || status=$?
"$py" -m coverage combine --rcfile="$out/coveragerc" -q
"$py" -m coverage report --rcfile="$out/coveragerc" > "$out/report.txt"
"$py" -m coverage json --rcfile="$out/coveragerc" -q -o "$out/coverage.json"
"$py" - "$out/coverage.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))["totals"]
print(f"bigmodel_cli/: {t['percent_covered']:.1f}% (statements and branches), "
      f"{100 * t['covered_lines'] / t['num_statements']:.1f}% of {t['num_statements']} statements, "
      f"{100 * t['covered_branches'] / t['num_branches']:.1f}% of {t['num_branches']} branches")
PY
echo "full report: $out/report.txt"
exit $status

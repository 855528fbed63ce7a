#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none): the CUDA tests, then the gpt2
# benchmark against the raw loop. Run from the repository root on a machine with PyTorch
# and this package importable; logs and the benchmark table land in $OUT (default gpu-out/).
#   REPS=2 STEPS=600 bash scripts/gpu_checks.sh
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/machine.txt"
python3 -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.version.cuda, os.cpu_count(), 'CPUs')" \
    | tee -a "$out/machine.txt"
python3 -m pytest -q -p no:cacheprovider --timeout=300 tests/test_cuda.py ${PYTEST_ARGS:-} 2>&1 \
    | tee "$out/test_cuda.log"
tests=${PIPESTATUS[0]}
python3 bench/run.py --cases gpt2 --reps "${REPS:-2}" --steps "${STEPS:-600}" 2>&1 | tee "$out/bench_gpt2.md"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench"
exit $(( tests || bench ))

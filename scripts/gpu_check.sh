#!/usr/bin/env bash
# The GPU checks of the core library and the benchmarks as one command, sized for a short lease
# of one GPU (about 10 minutes): the `cuda`-marked tests of tests/mabn and tests/benchmarks, then
# the quick benchmark on CUDA (CUDA-event timing, kernel launches per layer, `MABN fused`).
#
# Usage, from the repository root on a machine with PyTorch and a CUDA device:
#   bash scripts/gpu_check.sh [OUTPUT_FOLDER]      # default: $OUT, else ./gpu_check
# PYTHON names the interpreter (default python3).
# Logs and the benchmark's JSON are written to OUTPUT_FOLDER. Exit status: that of the tests,
# else that of the benchmark.
set -o pipefail
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out" || exit 2
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: torch sees no CUDA device; run this on a GPU machine" >&2; exit 2; }
"$python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee "$out/install.log" || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
timeout 330 "$python" -m pytest -m cuda -q -rs tests/mabn tests/benchmarks 2>&1 | tee "$out/pytest_cuda.log"
tests=$?
timeout 240 "$python" -m benchmarks.bench --device cuda --quick --repeat 1 --json "$out/bench_cuda.json" 2>&1 \
  | tee "$out/bench_cuda.md"
bench=$?
[ "$tests" -ne 0 ] && exit "$tests"
exit "$bench"

#!/usr/bin/env bash
# The checks only a CUDA machine can make, in a few minutes on one GPU:
#   1. every test that skips without CUDA (the files using tests.conftest.requires_cuda, with
#      -m skipif), and the fuzz test, whose draws include CUDA batches when CUDA is present;
#   2. benchmarks/buffer_overhead.py --smoke: one short round of every placement, the pinned-CPU
#      and CUDA ones included, at 3x32x32 and batch 128.
# Results go to $OUT if set, else benchmarks/results/gpu_selfcheck/. Without CUDA it prints one
# line and exits with 77 (skipped). Exits non-zero when a step failed, after running all of them.
#
# Usage: bash benchmarks/gpu_selfcheck.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_selfcheck: CUDA is not available here; nothing to check (exit 77)"
    exit 77
fi

results=${OUT:-benchmarks/results/gpu_selfcheck}
mkdir -p "$results"
failed=0

"$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])' \
    | tee "$results/device.txt"

mapfile -t cuda_files < <(grep -l "requires_cuda" tests/test_*.py)
"$PYTHON" -m pytest -q -rs -p no:cacheprovider -m skipif "${cuda_files[@]}" \
    --junitxml="$results/pytest_cuda.xml" 2>&1 | tee "$results/pytest_cuda.txt" || failed=1
"$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_fuzz.py \
    --junitxml="$results/pytest_fuzz.xml" 2>&1 | tee "$results/pytest_fuzz.txt" || failed=1

"$PYTHON" benchmarks/buffer_overhead.py --smoke --json "$results/buffer_overhead.json" 2>&1 \
    | tee "$results/buffer_overhead.txt" || failed=1

echo "gpu_selfcheck: results in $results ($([ "$failed" = 0 ] && echo passed || echo FAILED))"
exit "$failed"

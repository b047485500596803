#!/usr/bin/env bash
# Everything the CUDA backend promises that needs a GPU, in one command (specs/kernels-cuda.md §7):
# the GPU tests, the golden cases on the GPU and `upgd-ref bench --backend cupy` at 1M, 100M, 1B.
#
# On the lent H200 machine (device tool) the image has CuPy, PyTorch, JAX, Numba, pytest and
# hypothesis but not array-api-compat / array-api-strict and no network. Bring them as wheels:
#   here:  python3 -m pip download --no-deps array-api-compat array-api-strict -d .gpu-wheels
#          echo /.gpu-wheels/ >> .git/info/exclude
#   there: run(command="bash benchmarks/gpu_session.sh", carry=[".gpu-wheels"])
# Logs and the bench JSON go to $OUT (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/upgd-gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ -d .gpu-wheels ]; then
    python3 -m pip install -q --no-index --find-links .gpu-wheels array-api-compat array-api-strict
fi
python3 -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/device.txt"

status=0
python3 -m pytest -m gpu -v -p no:cacheprovider tests/kernels/test_cuda_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" || status=1
python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_compile.py tests/kernels/test_cuda_emulator.py 2>&1 \
    | tee -a "$OUT/gpu-tests.log" || status=1
upgd-ref golden verify --backend cupy 2>&1 | tee "$OUT/golden.log" || status=1
upgd-ref bench --backend cupy --sizes "${SIZES:-1M,100M,1B}" --json "$OUT/bench.json" 2>&1 \
    | tee "$OUT/bench.md" || status=1
exit $status

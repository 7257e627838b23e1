#!/usr/bin/env bash
# On a host with an NVIDIA GPU whose python3 already has torch, triton, pytest and scikit-learn (nothing is
# installed): runs the kernel tests on the GPU, then the layer benchmarks against torch eager.
#   bash scripts/gpu_check.sh [tests|bench|all]     (default all)
# Logs and the benchmark CSV go to $OUT when it is set, else to benchmarks/results/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-$root/benchmarks/results}"
mkdir -p "$out"
what="${1:-all}"
python3 -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# Every step runs even when one before it fails; the exit status is the first failure's.
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
    mapfile -t kernel_tests < <(grep -l -E "native_layers|triton_kernels" tests/test_*.py)
    python3 -m pytest -q -p no:cacheprovider "${kernel_tests[@]}" 2>&1 | tee "$out/gpu_tests.log" || status=$?
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    # Each benchmark case is checked against torch before it is timed; a mismatch fails the run at its end.
    for dtype in float32 bfloat16; do
        python3 -m benchmarks.layers --dtype "$dtype" 2>&1 | tee "$out/layers_$dtype.log" || \
            { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
    done
    [ "$out" = "$root/benchmarks/results" ] || cp benchmarks/results/layers.csv "$out/"
fi
exit "$status"

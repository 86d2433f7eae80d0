#!/bin/bash
# The `gpu`-marked tests on one GPU machine, split by file into groups run side by side: a
# serial `pytest -m gpu` took over 550 s on a slow H100 host, near the device's per-command
# limit. One log per group (-v, short tracebacks, slowest tests) in DIR, then each group's
# summary line; exit status 0 only if every group passed.
# Usage: bash benchmarks/gpu_tests.sh [DIR] (default $OUT, else .); TIMEOUT: seconds per
# group (400); PYTHON: the interpreter (python3).
cd "$(dirname "$0")/.." || exit 2
dir=${1:-${OUT:-.}}
mkdir -p "$dir"
# (tests/test_benchmark_scripts.py checks that every file with gpu tests is in one group)
groups=("tests/test_gpu_triton.py"
        "tests/test_gpu_xla.py"
        "tests/test_gpu_flashinfer.py tests/test_gpu_vllm.py tests/test_gpu_quantize.py"
        "tests/test_gpu_tvm_ffi.py tests/test_benchmark_scripts.py")
pids=()
for k in "${!groups[@]}"; do
    # shellcheck disable=SC2086  # (a group is several files)
    timeout "${TIMEOUT:-400}" "${PYTHON:-python3}" -m pytest -m gpu -v --tb=short --durations=6 \
        -p no:cacheprovider ${groups[$k]} > "$dir/gpu-tests-$k.log" 2>&1 &
    pids+=($!)
done
status=0
for k in "${!groups[@]}"; do
    wait "${pids[$k]}"; rc=$?
    [ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1  # (5: nothing collected)
    echo "group $k (${groups[$k]}): rc=$rc, $(tail -n 1 "$dir/gpu-tests-$k.log")"
done
exit $status

#!/usr/bin/env bash
# One command for a GPU session: build spectral_kernels._C in place for this device, then run a stage.
#
#   bash benchmarks/gpu/run.sh STAGE OUTDIR        STAGE: verify | tests | sanitize | bench | tune | all
#
#   verify    first in a short session (a 15-minute device budget): what has never run on a GPU —
#             the cuda and triton adapter-bank paths (their test files on CUDA), the Triton float32
#             tests, then the adapter-bank benchmark on the three backends
#   tests     every test marked gpu (-rs, SPECTRAL_KERNELS_CUDA_SYNC=1; a skipped GPU test is a
#             failure here), then the Triton test file on CUDA
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck over a reduced selection of the
#             cuda-backend tests
#   bench     the goal benchmarks (benchmarks/gpu/bench_goals.py), the truncated SVD on a
#             7B-class model (benchmarks/gpu/bench_svd_7b.py) and adapter banks on the torch, triton
#             and cuda backends, bf16, T = 1024 and T = 16 (benchmarks/bench_adapter_banks.py)
#   tune      the plan and tile measurements behind ops/plans.py (benchmarks/gpu/tune_plans.py)
#
# Made for a fresh GPU machine with python3, torch, triton, nvcc, cmake, ninja, pybind11, peft,
# transformers, pytest-benchmark and pytest-timeout installed, and no network: nothing is installed,
# the package runs from this checkout (PYTHONPATH). Each stage writes JSON, logs and a summary table
# (summary_<stage>.md) into OUTDIR. Without a CUDA device every stage says so and exits 0.
# SK_COMMIT names the commit in the results where the checkout has no .git.
# SK_STAGE_SECONDS (default 540) bounds the whole call, build included, inside one device command's
# 10 minutes: every step's timeout is cut to what is left of it, so a stage ends with its summary
# written instead of being killed from outside.
set -uo pipefail
usage="usage: run.sh verify|tests|sanitize|bench|tune|all OUTDIR"
stage=${1:?$usage}
out=${2:?$usage}
budget=${SK_STAGE_SECONDS:-540}
# cap N: N seconds, or what is left of the budget (less 20 s for the summary) when that is less
cap() { local left=$((budget - SECONDS - 20)); [ "$left" -lt 10 ] && left=10; [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

case "$stage" in verify|tests|sanitize|bench|tune|all) ;; *) echo "unknown stage '$stage' (verify, tests, sanitize, bench, tune, all)" >&2; exit 2 ;; esac

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "stage '$stage' skipped: no CUDA device is visible to torch on this machine" | tee "$out/summary_$stage.md"
  exit 0
fi

# --- build _C in place, for this device's architecture only --------------------------------------
arch=$("$py" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')
build_log="$out/build.log"
start=$SECONDS
if ! SPECTRAL_KERNELS_CUDA=1 SPECTRAL_KERNELS_CUDA_ARCHS="$arch" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$py" setup.py -q build_ext --inplace >"$build_log" 2>&1; then
  tail -40 "$build_log"
  echo "build of spectral_kernels._C for sm_$arch FAILED (log: $build_log)" | tee "$out/summary_$stage.md"
  exit 1
fi
echo "built spectral_kernels._C for sm_$arch in $((SECONDS - start)) s"
"$py" -c 'from spectral_kernels import _ext; print(_ext.extension_summary())' || exit 1

status=0
banks_args="--device cuda --dtype bfloat16 --backends torch,triton,cuda"
# Adapter banks at T = 1024: one JSON line per (N, backend) in the log as it goes, the JSON file at the end.
run_bank_bench() {
  timeout "$(cap 120)" "$py" benchmarks/bench_adapter_banks.py $banks_args --out "$out/adapter_banks_cuda.json" 2>&1 \
    | tee "$out/bench_adapter_banks.log"
  return "${PIPESTATUS[0]}"
}

run_verify_tests() {
  # on CUDA, not the interpreter: the bank files' unmarked tests take the device too
  SPECTRAL_KERNELS_CUDA_SYNC=1 timeout "$(cap 200)" "$py" -m pytest -q -rs -p no:cacheprovider --timeout 120 \
    --junitxml "$out/verify_banks.xml" tests/ops/test_spectral_linear_cuda_banks.py tests/ops/test_adapter_banks.py \
    tests/tuning/test_banks.py 2>&1 | tee "$out/verify_banks.log"
  local rc=${PIPESTATUS[0]}
  SPECTRAL_KERNELS_CUDA_SYNC=1 timeout "$(cap 120)" "$py" -m pytest -q -rs -p no:cacheprovider --timeout 100 \
    -k float32 --junitxml "$out/verify_triton_fp32.xml" tests/ops/test_spectral_linear_triton.py 2>&1 \
    | tee "$out/verify_triton_fp32.log"
  local rc2=${PIPESTATUS[0]}
  "$py" benchmarks/gpu/summarize_junit.py "$out/summary_verify.md" "$out/verify.json" \
    "banks:$out/verify_banks.xml:lenient" "triton float32:$out/verify_triton_fp32.xml:lenient"
  local rc3=$?
  [ "$rc" = 0 ] && [ "$rc2" = 0 ] && [ "$rc3" = 0 ] || status=1
}

run_verify() {
  run_verify_tests
  run_bank_bench || status=1
}

run_tests() {
  local junit="$out/tests_gpu.xml"
  SPECTRAL_KERNELS_CUDA_SYNC=1 timeout "$(cap 420)" "$py" -m pytest -q -rs -m gpu -p no:cacheprovider \
    --timeout 300 --junitxml "$junit" tests 2>&1 | tee "$out/tests_gpu.log"
  local rc=${PIPESTATUS[0]}
  # Triton tests that are not marked gpu run on CUDA here too (the interpreter is off).
  SPECTRAL_KERNELS_CUDA_SYNC=1 timeout "$(cap 240)" "$py" -m pytest -q -rs -p no:cacheprovider --timeout 200 \
    -m "not gpu" --junitxml "$out/tests_triton.xml" tests/ops/test_spectral_linear_triton.py 2>&1 | tee "$out/tests_triton.log"
  local rc2=${PIPESTATUS[0]}
  "$py" benchmarks/gpu/summarize_junit.py "$out/summary_tests.md" "$out/tests.json" \
    "gpu-marked:$junit:strict" "triton file:$out/tests_triton.xml:lenient"
  local rc3=$?
  [ "$rc" = 0 ] && [ "$rc2" = 0 ] && [ "$rc3" = 0 ] || status=1
}

run_sanitize() {
  local cs
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  # Every tensor its own cudaMalloc, so that memcheck sees the true bounds of each buffer.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  local sel='test_cuda_decode_edges or test_cuda_strided or test_cuda_padded or test_cuda_decode_workspace or (test_coeff_and_bias_grads and dtype2) or (test_cuda_matches_reference and dtype1) or test_cuda_bank_edges'
  : >"$out/summary_sanitize.md"
  for tool in memcheck racecheck synccheck; do
    local t0=$SECONDS
    timeout "$(cap 60)" "$cs" --tool "$tool" --kernel-name kns=spectral_kernels --error-exitcode 99 --print-limit 20 \
      "$py" -m pytest -q -x -p no:cacheprovider tests/ops/test_spectral_linear_cuda.py \
      tests/ops/test_spectral_linear_cuda_banks.py -k "$sel" \
      >"$out/sanitize_$tool.log" 2>&1
    local rc=$?
    local errors
    errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+ error' "$out/sanitize_$tool.log" | tail -1)
    echo "| $tool | exit $rc | ${errors:-no summary} | $((SECONDS - t0)) s |" | tee -a "$out/summary_sanitize.md"
    [ "$rc" = 0 ] || status=1
  done
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
}

run_bench() {
  timeout "$(cap 300)" "$py" benchmarks/gpu/bench_goals.py --out "$out" 2>&1 | tee "$out/bench_goals.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  timeout "$(cap 200)" "$py" benchmarks/gpu/bench_svd_7b.py --out "$out" 2>&1 | tee "$out/bench_svd_7b.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  run_bank_bench || status=1
  timeout "$(cap 90)" "$py" benchmarks/bench_adapter_banks.py $banks_args --batch 16 --seq 1 \
    --out "$out/adapter_banks_cuda_decode.json" 2>&1 | tee "$out/bench_adapter_banks_decode.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
}

run_tune() {
  timeout "$(cap 400)" "$py" benchmarks/gpu/tune_plans.py --out "$out" 2>&1 | tee "$out/tune.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
}

case "$stage" in
  verify) run_verify ;;
  tune) run_tune ;;
  tests) run_tests ;;
  sanitize) run_sanitize ;;
  bench) run_bench ;;
  all) run_verify_tests; run_tests; run_sanitize; run_bench ;;  # past one command's limit: for a longer lease
esac
echo "stage '$stage': $([ $status = 0 ] && echo passed || echo FAILED) in $SECONDS s; results in $out"
exit $status

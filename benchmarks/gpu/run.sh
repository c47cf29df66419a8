#!/usr/bin/env bash
# One command for a GPU session: build spectral_kernels._C in place for this device, then run a stage.
#
#   bash benchmarks/gpu/run.sh STAGE OUTDIR     STAGE: quick | rest | verify | tests | sanitize | bench | tune | all
#
#   quick     for one 15-minute device window, under 9 minutes with the build; in this order, the
#             summary rewritten after each step: (1) the paths that have never run on a GPU pass
#             (cuda and Triton adapter banks, the Triton float32 tests); (2) the goal table
#             (bench_goals.py main: T = 8192, 4096², bf16, W frozen, k = 16, 64); (3) the decode
#             table (T = 1, 4, 16); (4) the fused-plan candidates timed side by side
#   rest      the GPU tests quick did not run (gpu-marked tests of every other file, the rest of
#             the Triton file on CUDA): the second command of a window
#   verify    step (1) of quick, then the adapter-bank benchmark on the three backends
#   tests     every GPU test: quick's test step, then rest's
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck over a reduced selection of the
#             cuda-backend tests
#   bench     the goal benchmarks (all sections of benchmarks/gpu/bench_goals.py), the truncated SVD
#             of a 7B-class model (bench_svd_7b.py) and adapter banks on the torch, triton and cuda
#             backends, bf16, T = 1024 and T = 16 (benchmarks/bench_adapter_banks.py)
#   tune      the plan and tile measurements behind ops/plans.py (benchmarks/gpu/tune_plans.py)
#   all       quick's tests, rest, sanitize, bench: longer than one device command, for a longer lease
#
# Made for a fresh GPU machine with python3, torch, triton, nvcc, cmake, ninja, pybind11, peft,
# transformers, pytest-benchmark and pytest-timeout installed (pytest-xdist is used when present),
# and no network: nothing is installed, the package runs from this checkout (PYTHONPATH).
# OUTDIR receives at most 8 files: summary.md (rewritten after each step: what ran, verdicts,
# tables), the JSON results, and logs.tar.gz (build log, pytest logs and JUnit XML, benchmark
# logs). A stage fails (exit 1) when a step fails, when a test selection runs no test, when a test
# is skipped for a reason not on lib.sh's allow-list, or when _C does not load for this device.
# Without a CUDA device every stage says so and exits 0.
# SK_COMMIT names the commit in the results where the checkout has no .git.
# SK_STAGE_SECONDS (default 540) bounds the whole call, build included, inside one device command's
# 10 minutes: every step's timeout is cut to what is left of it (cap in lib.sh), so a stage ends
# with its summary written instead of being killed from outside.
set -uo pipefail
usage="usage: run.sh quick|rest|verify|tests|sanitize|bench|tune|all OUTDIR"
stage=${1:?$usage}
out=${2:?$usage}
budget=${SK_STAGE_SECONDS:-540}
root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=lib.sh
source "$root/benchmarks/gpu/lib.sh"
cd "$root"
py=${PYTHON:-python3}

case "$stage" in quick|rest|verify|tests|sanitize|bench|tune|all) ;;
  *) echo "unknown stage '$stage' (quick, rest, verify, tests, sanitize, bench, tune, all)" >&2; exit 2 ;; esac

# Step timeouts (seconds) of quick, in order. Their sum plus SUMMARY_RESERVE fits the default
# budget (tests/test_benchmarks.py checks it); cap() shortens a step when earlier ones ran long.
QUICK_BUILD=150       # _C for one architecture (sm_90 on an H100/H200), then the import check
QUICK_TESTS=150       # cuda and Triton bank files, Triton float32 tests, in parallel where xdist is there
QUICK_GOALS=100       # bench_goals main: k = 16, 64, forward and forward+backward, 11 providers
QUICK_DECODE=70       # bench_goals decode: 4096² and 11008×4096, k = 16, T = 1, 4, 16
QUICK_CANDIDATES=50   # bench_goals candidates: the fused-plan candidates of the goal shape

# The Triton float32 tests (their ids name the dtype; the fp32-only tests end in _float32).
TRITON_FP32_K="float32"
# The test files whose paths had never run on a GPU (quick's step 1).
NEVER_RUN_FILES="tests/ops/test_spectral_linear_cuda_banks.py tests/ops/test_adapter_banks.py tests/tuning/test_banks.py"
TRITON_FILE=tests/ops/test_spectral_linear_triton.py

mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.md"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "stage '$stage' skipped: no CUDA device is visible to torch on this machine" | tee "$summary"
  exit 0
fi

work=$(mktemp -d)   # logs and JUnit XML; archived into OUTDIR/logs.tar.gz after every step
trap 'rm -rf "$work"' EXIT
commit=${SK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
device=$("$py" -c 'import torch; print(torch.cuda.get_device_name(0))')
{
  echo "# run.sh $stage: $device, commit $commit, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "torch $("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), triton $("$py" -c 'import triton; print(triton.__version__)')"
  echo
} >"$summary"
status=0

# step NAME MARKDOWN_FILE RC: append a step's section to the summary, archive the logs, print it.
step_done() {
  local name=$1 md=$2 rc=$3 verdict
  verdict=$([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)")
  [ "$rc" = 0 ] || status=1
  { echo "## $name: $verdict ($SECONDS s into the call)"; echo; [ -s "$md" ] && cat "$md"; echo; } >>"$summary"
  pack_logs "$work" "$out"
  echo "== $name: $verdict"
}

# --- build _C in place, for this device's architecture only --------------------------------------
build() {
  local arch rc
  arch=$("$py" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')
  SPECTRAL_KERNELS_CUDA=1 SPECTRAL_KERNELS_CUDA_ARCHS="$arch" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    timeout -k 10 "$(cap "$1")" "$py" setup.py -q build_ext --inplace >"$work/build.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || tail -40 "$work/build.log" >"$work/build.md"
  # The extension must load and accept this device: a missing or stale _C fails the stage here
  # instead of turning every cuda test into a skip.
  "$py" -c 'import sys, torch
from spectral_kernels import _ext
ok, why = _ext.cuda_status(torch.device("cuda"))
print(f"- `_C`: {why}")
sys.exit(0 if ok else 1)' >>"$work/build.md" 2>&1 || rc=1
  step_done "build of spectral_kernels._C for sm_$arch" "$work/build.md" "$rc"
}

# pytest with the GPU settings; junit to $work/NAME.xml, log to $work/NAME.log. With xdist (when
# installed) 4 processes share the tests, so their Triton kernels compile in parallel: whole files
# per process (DIST=loadfile, the default) or single tests (DIST=load, for one file).
has_xdist=$("$py" -c 'import xdist' 2>/dev/null && echo 1 || true)
run_pytest() {
  local name=$1 seconds=$2 par=()
  shift 2
  [ -n "$has_xdist" ] && par=(-n 4 --dist "${DIST:-loadfile}")
  SPECTRAL_KERNELS_CUDA_SYNC=1 timeout -k 10 "$(cap "$seconds")" "$py" -m pytest -q -rs -p no:cacheprovider \
    --timeout 120 "${par[@]}" --junitxml "$work/$name.xml" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $(tail -1 "$work/$name.log")"
  # for the summary: how a failed run ended (the whole log is in logs.tar.gz)
  [ "$rc" = 0 ] || { echo; echo "\`$name\` exit $rc$([ "$rc" = 124 ] && echo ' (time limit)'), log ends:"; echo '```'
                     tail -8 "$work/$name.log"; echo '```'; } >"$work/$name.tail.md"
  return $rc
}

# --- test steps ------------------------------------------------------------------------------------
# finish_tests PREFIX TITLE RC NAME:XML...: the JUnit verdicts into OUTDIR/tests_PREFIX.json and the
# summary, with how each failed pytest run ended; the step fails if a run or a verdict did.
finish_tests() {
  local prefix=$1 title=$2 rc=$3
  shift 3
  summarize "$work/$prefix.md" "$out/tests_$prefix.json" "$@" >/dev/null || rc=1
  cat "$work/$prefix"_*.tail.md >>"$work/$prefix.md" 2>/dev/null
  step_done "$title" "$work/$prefix.md" "$rc"
}

# --ignore for the files quick's first step runs whole or by dtype (the other GPU tests are the rest)
quick_file_ignores() {
  local f
  for f in $NEVER_RUN_FILES $TRITON_FILE; do printf -- '--ignore\n%s\n' "$f"; done
}

never_run_tests() {
  # the two selections side by side (GPU memory and CPU cores allow it): the step takes the longer
  run_pytest never_run_banks "$1" $NEVER_RUN_FILES &
  local p1=$!
  DIST=load run_pytest never_run_triton_fp32 "$1" -k "$TRITON_FP32_K" "$TRITON_FILE" &
  local p2=$!
  wait $p1
  local rc=$?
  wait $p2 || rc=1
  finish_tests never_run "never-run paths: cuda and Triton adapter banks, Triton float32" "$rc" \
    "banks (cuda, triton, tuning):$work/never_run_banks.xml" "triton float32:$work/never_run_triton_fp32.xml"
}

rest_tests() {
  local ignores rc=0
  mapfile -t ignores < <(quick_file_ignores)
  run_pytest rest_gpu 300 -m gpu "${ignores[@]}" tests || rc=1
  # not the slow AOT compile test: on a GPU the kernels themselves compile and run
  DIST=load run_pytest rest_triton 200 -m "not slow" -k "not $TRITON_FP32_K" "$TRITON_FILE" || rc=1
  finish_tests rest "remaining GPU tests" "$rc" \
    "gpu-marked (other files):$work/rest_gpu.xml" "triton, not float32:$work/rest_triton.xml"
}

# --- benchmark steps -----------------------------------------------------------------------------
# goals TAG SECONDS ARGS...: bench_goals.py into OUTDIR/goals_TAG.json, its table into the summary.
goals() {
  local tag=$1 seconds=$2
  shift 2
  timeout -k 10 "$(cap "$seconds")" "$py" benchmarks/gpu/bench_goals.py --out "$out" --tag "$tag" \
    --summary "$work/goals_$tag.md" "$@" >"$work/goals_$tag.log" 2>&1
  local rc=$?
  [ -s "$out/goals_$tag.json" ] || { echo "no results written (goals_$tag.json missing)" >>"$work/goals_$tag.md"; rc=1; }
  tail -5 "$work/goals_$tag.log"
  return $rc
}

banks_args="--device cuda --dtype bfloat16 --backends torch,triton,cuda"
bank_bench() {
  timeout -k 10 "$(cap "$1")" "$py" benchmarks/bench_adapter_banks.py $banks_args --out "$out/adapter_banks_cuda.json" \
    >"$work/bank_bench.log" 2>&1
  local rc=$?
  tail -20 "$work/bank_bench.log" | sed 's/^/    /' >"$work/bank_bench.md"
  step_done "adapter-bank benchmark, T = 1024" "$work/bank_bench.md" "$rc"
}

run_quick() {
  build "$QUICK_BUILD"
  never_run_tests "$QUICK_TESTS"
  goals main "$QUICK_GOALS" --sections main --ranks 16,64
  step_done "goal table (T = 8192, 4096², bf16, W frozen)" "$work/goals_main.md" $?
  goals decode "$QUICK_DECODE" --sections decode --ranks 16
  step_done "decode table" "$work/goals_decode.md" $?
  goals candidates "$QUICK_CANDIDATES" --sections candidates --ranks 16,64
  step_done "fused-plan candidates" "$work/goals_candidates.md" $?
}

run_sanitize() {
  local cs
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  # Every tensor its own cudaMalloc, so that memcheck sees the true bounds of each buffer.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  local sel='test_cuda_decode_edges or test_cuda_strided or test_cuda_padded or test_cuda_decode_workspace or (test_coeff_and_bias_grads and dtype2) or (test_cuda_matches_reference and dtype1) or test_cuda_bank_edges'
  local md="$work/sanitize.md" rc_all=0
  echo "| tool | exit | errors | seconds |" >"$md"; echo "|---|---|---|---|" >>"$md"
  for tool in memcheck racecheck synccheck; do
    local t0=$SECONDS
    timeout -k 10 "$(cap 60)" "$cs" --tool "$tool" --kernel-name kns=spectral_kernels --error-exitcode 99 --print-limit 20 \
      "$py" -m pytest -q -x -p no:cacheprovider tests/ops/test_spectral_linear_cuda.py \
      tests/ops/test_spectral_linear_cuda_banks.py -k "$sel" \
      >"$work/sanitize_$tool.log" 2>&1
    local rc=$?
    local errors
    errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+ error' "$work/sanitize_$tool.log" | tail -1)
    # pytest's own "N passed": a sanitizer run that ran no test proves nothing
    if [ "$rc" = 0 ] && ! grep -Eq '[0-9]+ passed' "$work/sanitize_$tool.log"; then rc=5; fi
    echo "| $tool | $rc | ${errors:-no summary} | $((SECONDS - t0)) |" >>"$md"
    [ "$rc" = 0 ] || rc_all=1
  done
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
  step_done "compute-sanitizer" "$md" "$rc_all"
}

run_bench() {
  goals all 300 --sections main,parts,decode,pure,sweep
  step_done "goal benchmarks (all sections)" "$work/goals_all.md" $?
  timeout -k 10 "$(cap 200)" "$py" benchmarks/gpu/bench_svd_7b.py --out "$work" >"$work/bench_svd_7b.log" 2>&1
  local rc=$?
  cp "$work/svd_7b.json" "$out/" 2>/dev/null || rc=1
  step_done "truncated SVD of a 7B-class model" "$work/summary_svd.md" "$rc"
  bank_bench 120
  timeout -k 10 "$(cap 90)" "$py" benchmarks/bench_adapter_banks.py $banks_args --batch 16 --seq 1 \
    --out "$out/adapter_banks_cuda_decode.json" >"$work/bank_bench_decode.log" 2>&1
  rc=$?
  tail -20 "$work/bank_bench_decode.log" | sed 's/^/    /' >"$work/bank_bench_decode.md"
  step_done "adapter-bank benchmark, decode (T = 16)" "$work/bank_bench_decode.md" "$rc"
}

run_tune() {
  timeout -k 10 "$(cap 400)" "$py" benchmarks/gpu/tune_plans.py --out "$work" >"$work/tune.log" 2>&1
  local rc=$?
  cp "$work/tune.json" "$out/" 2>/dev/null || rc=1
  step_done "plan and tile measurements" "$work/summary_tune.md" "$rc"
}

case "$stage" in
  quick) run_quick ;;
  rest) build 200; rest_tests ;;
  verify) build 200; never_run_tests 200; bank_bench 120 ;;
  tests) build 200; never_run_tests 200; rest_tests ;;
  sanitize) build 200; run_sanitize ;;
  bench) build 200; run_bench ;;
  tune) build 200; run_tune ;;
  all) build 200; never_run_tests 200; rest_tests; run_sanitize; run_bench ;;
esac
fit_outdir "$work" "$out"
echo "stage '$stage': $([ $status = 0 ] && echo passed || echo FAILED) in $SECONDS s; results in $out" | tee -a "$summary"
exit $status

# Helpers of benchmarks/gpu/run.sh (sourced; tests/test_benchmarks.py sources it too, on CPU).
#
# budget      seconds the whole call may take (run.sh sets it from SK_STAGE_SECONDS)
# cap N       N seconds, or what is left of the budget less SUMMARY_RESERVE when that is less (>= 10)
# SKIP_ALLOW  the skips a GPU stage accepts: "regex<TAB>why it may skip on the GPU machine"
# pack_logs   archive the scratch logs into OUTDIR/logs.tar.gz (one file, however many logs)

# Seconds kept back at the end of a call for the last summary and the log archive.
SUMMARY_RESERVE=20

cap() {
  local left=$((budget - SECONDS - SUMMARY_RESERVE))
  [ "$left" -lt 10 ] && left=10
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

# A skipped test fails its stage unless the skip's message matches one of these patterns (an
# extended regex, matched by Python's re.search), each with the reason that skip is expected on
# the GPU machine. Everything else a GPU stage skips is a failure: on that machine a skip means
# that something a test needed (the compiled extension, a device feature) is missing.
SKIP_ALLOW=(
  $'bitsandbytes not installed\tthe GPU image has no bitsandbytes and nothing can be installed there (no network); the bnb 4-bit test needs it'
)

# summarize OUT_MD OUT_JSON NAME:FILE.xml ...: the JUnit summary with the allow-list above.
summarize() {
  local md=$1 json=$2 args=() entry
  shift 2
  for entry in "${SKIP_ALLOW[@]}"; do args+=(--allow-skip "$entry"); done
  "$py" "$root/benchmarks/gpu/summarize_junit.py" "$md" "$json" "${args[@]}" "$@"
}

# pack_logs WORKDIR OUTDIR: every file under WORKDIR into OUTDIR/logs.tar.gz (replaced each time),
# so that OUTDIR holds a handful of result files whatever a stage logged: a device command
# returns at most 8 files.
pack_logs() {
  tar -czf "$2/logs.tar.gz.tmp" -C "$1" . && mv "$2/logs.tar.gz.tmp" "$2/logs.tar.gz"
}

# Files a device command returns from OUTDIR, at most.
MAX_OUT_FILES=8

# fit_outdir WORKDIR OUTDIR: leave at most MAX_OUT_FILES plain files in OUTDIR. summary.md and
# logs.tar.gz stay; past them the first files by name stay and everything else (folders too) moves
# into WORKDIR/outdir_extra, which goes into the archive.
fit_outdir() {
  local work=$1 out=$2 kept=0 f
  local room=$((MAX_OUT_FILES - 2))
  [ "$(find "$out" -mindepth 1 -maxdepth 1 | wc -l)" -le "$MAX_OUT_FILES" ] && return 0
  mkdir -p "$work/outdir_extra"
  for f in "$out"/*; do
    case "$(basename "$f")" in summary.md|logs.tar.gz) continue ;; esac
    if [ -f "$f" ] && [ "$kept" -lt "$room" ]; then kept=$((kept + 1)); continue; fi
    mv "$f" "$work/outdir_extra/"
  done
  pack_logs "$work" "$out"
}

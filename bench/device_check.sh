#!/usr/bin/env bash
# One command for every GPU check (issue 9, section 1):  bash bench/device_check.sh OUT [--dry]
#
# Steps, most valuable first (a cut session keeps what landed): env, build, tests (is the cuda
# backend correct?), benchmarks (the issue's figures: floors first, since every ratio needs them),
# then compute-sanitizer (slow, and some runtimes refuse it: recorded 'not supported').
# Every step has its own `timeout`, clipped to what is left of DC_BUDGET_S (default 470 s, so the
# whole stays under 8 minutes); a step's failure never stops the next. After each step the
# status goes to OUT/steps.tsv and report.md / results.json are rewritten.
# OUT holds at most 7 files (the device tool returns 8): report.md results.json bench.json
# env.json steps.tsv junit.xml log.txt.
# --dry: the CPU rehearsal CI runs (tiny sizes, build into a temp folder, a small pytest subset,
# cuda and sanitizer steps reported as skipped; cpp and torch still run).
# DC_ONLY="step step": run only those steps (a rerun in a second device window).
set -u
OUT=${1:?usage: bash bench/device_check.sh OUT [--dry]}
DRY=0
[[ "${2:-}" == "--dry" ]] && DRY=1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")
PY=${PYTHON:-python3}
DRYFLAG=""
[[ $DRY == 1 ]] && DRYFLAG="--dry"
BUDGET=${DC_BUDGET_S:-470}
T0=$SECONDS
export ROOT OUT WORK PY DRY DRYFLAG PYTHONUNBUFFERED=1
# The suite's own dry run of this script (tests/test_device_check.py) skips inside a real run.
export NUDGEFAST_DEVICE_CHECK=1
# The package the steps import: the checkout, built in place on the device; in dry mode a copy
# of it in the temp folder, built there (the checkout's own build is never touched, and a
# checkout without its extension must not shadow the copy).
PKG_ROOT=$ROOT
[[ $DRY == 1 ]] && PKG_ROOT="$WORK/lib"
export PKG_ROOT
export PYTHONPATH="$PKG_ROOT${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/steps.tsv"
: > "$OUT/log.txt"
rm -f "$OUT/bench.json" "$OUT/junit.xml" "$OUT/env.json" "$OUT/results.json" "$OUT/report.md"

# Exit codes a step uses: 0 ok, 77 skipped, 78 not supported; 124/137 timeout; else failed.
step() {
  local name=$1 limit=$2 fn=$3 left t rc status start dur msg
  if [[ -n "${DC_ONLY:-}" && " $DC_ONLY " != *" $name "* ]]; then
    printf '%s\tskipped\t77\t0\t0\tnot selected (DC_ONLY)\n' "$name" >> "$OUT/steps.tsv"; return
  fi
  left=$((BUDGET - (SECONDS - T0)))
  if (( left < 5 )); then
    printf '%s\tskipped\t77\t0\t0\tno time left in the %ss budget\n' "$name" "$BUDGET" >> "$OUT/steps.tsv"
    report; return
  fi
  t=$(( limit < left ? limit : left ))
  rm -f "$WORK/note"
  start=$SECONDS
  echo "== $name (timeout ${t}s)" >&2
  DC_NOTE="$WORK/note" timeout -k 10 "$t" bash -c "$fn" > "$WORK/$name.log" 2>&1
  rc=$?
  dur=$((SECONDS - start))
  case $rc in
    0) status=ok ;; 77) status=skipped ;; 78) status="not supported" ;;
    124|137) status=timeout ;; *) status=failed ;;
  esac
  msg=$(head -c 300 "$WORK/note" 2>/dev/null | tr '\t\n' '  ')
  [[ $status == timeout ]] && msg="killed at ${t}s; $msg"
  [[ $status == failed && -z $msg ]] && msg="exit $rc: $(tail -n 1 "$WORK/$name.log" | head -c 200 | tr '\t|' '  ')"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dur" "$t" "$msg" >> "$OUT/steps.tsv"
  {
    echo "==== $name: $status (rc $rc, ${dur}s of ${t}s) $msg"
    if (( $(wc -l < "$WORK/$name.log") > 1500 )); then
      head -n 300 "$WORK/$name.log"; echo "[... $(wc -l < "$WORK/$name.log") lines, cut ...]"
      tail -n 1200 "$WORK/$name.log"
    else cat "$WORK/$name.log"; fi
  } >> "$OUT/log.txt"
  echo "   $status (${dur}s) $msg" >&2
  report
}
report() { timeout 60 "$PY" bench/device_check.py report "$OUT" $DRYFLAG >> "$WORK/report.log" 2>&1 \
             || echo "report failed: $(tail -n 3 "$WORK/report.log")" >&2; }

s_env() {
  "$PY" bench/device_check.py env "$OUT" $DRYFLAG
}
s_build() {
  if [[ $DRY == 1 ]]; then  # never touch the checkout's own build: compile into the temp folder
    mkdir -p "$WORK/lib"
    tar -C "$ROOT" --exclude='__pycache__' --exclude='*.so' --exclude='*.pyd' -cf - nudgefast \
      | tar -C "$WORK/lib" -xf - || exit 1
    "$PY" setup.py -q build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp" || exit 1
    echo "dry: a copy of the package built in a temp folder runs the rest" > "$DC_NOTE"
  else
    "$PY" setup.py -q build_ext --inplace -j "$(nproc)" || exit 1
  fi
  "$PY" -P -m nudgefast backends
}
s_tests() {
  local args=(-p no:cacheprovider -q -rs --junitxml="$OUT/junit.xml" -o junit_family=xunit2)
  if [[ $DRY == 1 ]]; then
    "$PY" -P -m pytest tests/test_cuda.py tests/test_cuda_qtopk.py tests/ops/test_project.py "${args[@]}"
  else
    # Every test file, so the GPU-only ones run (test_cuda.py, test_cuda_qtopk.py, the cuda
    # cases of tests/ops/). xdist (in the device image) spreads the CPU-heavy cases over the
    # cores; the GPU is shared.
    if "$PY" -c "import xdist" 2>/dev/null; then args+=(-n "${DC_TEST_WORKERS:-8}"); fi
    "$PY" -P -m pytest tests "${args[@]}"
  fi
  local rc=$?
  "$PY" - "$OUT/junit.xml" > "$DC_NOTE" <<'EOF'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r.find("testsuite") if r.tag == "testsuites" else r
print(f"{s.get('tests')} tests, {s.get('failures')} failures, {s.get('errors')} errors, {s.get('skipped')} skipped", end="")
EOF
  exit $rc
}
s_bench() { "$PY" bench/device_check.py bench "$1" "$OUT" $DRYFLAG; }
s_floors() { s_bench floors; }
s_topk_cuda() { s_bench topk-cuda; }
s_fit_cuda() { s_bench fit-cuda; }
s_cpp() { s_bench cpp; }
s_launch_sweep() { s_bench launch-sweep; }

# compute-sanitizer over awkward-size CUDA tests (CuPy's kernel cache is warm from the tests).
# tests/test_cuda_qtopk.py: only its test_qtopk_small_for_sanitizers cases (both kinds, both
# selection paths; its other tests would match "matches_reference" and take minutes there).
SAN_FILES="tests/test_cuda.py tests/test_cuda_qtopk.py tests/ops/test_topk_update.py tests/ops/test_nudge_m_intervals.py
 tests/ops/test_nudge_n_sweep.py tests/ops/test_query_gradient.py tests/ops/test_project.py"
SAN_K="cuda and ((fused_and_two_phase and nq150 and (k17 or k257)) or continues_state or repeated_exclude or exact_duplicates or (matches_reference and not test_topk_update and not qtopk) or qtopk_small)"
SAN_K_RACE="(fused_and_two_phase and nq150 and (k17 or k257)) or continues_state or qtopk_small"
export SAN_FILES SAN_K SAN_K_RACE
s_san_probe() {
  if [[ $DRY == 1 ]]; then echo "dry: no GPU" > "$DC_NOTE"; exit 77; fi
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  if [[ -z $cs ]]; then echo "compute-sanitizer not found" | tee "$DC_NOTE" "$WORK/san_unsupported"; exit 78; fi
  echo "$cs" > "$WORK/san_path"
  "$cs" --tool memcheck --error-exitcode 97 "$PY" -c \
    "import cupy as cp; x = cp.arange(1000, dtype=cp.float32); print(float((x * 2).sum()))" 2>&1 | tee "$WORK/probe.out"
  local rc=${PIPESTATUS[0]}
  if (( rc != 0 )) || grep -qiE "not supported|error 999|unable to|LibraryNotLoaded" "$WORK/probe.out"; then
    echo "this runtime refuses compute-sanitizer (rc $rc): $(grep -iE 'not supported|error|unable' "$WORK/probe.out" | head -n 2 | tr '\n' ' ')" \
      | tee "$DC_NOTE" "$WORK/san_unsupported"
    exit 78
  fi
}
s_san() {  # $1: tool, $2: -k expression
  if [[ $DRY == 1 ]]; then echo "dry: no GPU" > "$DC_NOTE"; exit 77; fi
  if [[ -f $WORK/san_unsupported ]]; then cat "$WORK/san_unsupported" > "$DC_NOTE"; exit 78; fi
  local cs
  cs=$(cat "$WORK/san_path" 2>/dev/null) || { echo "probe did not run" > "$DC_NOTE"; exit 78; }
  # shellcheck disable=SC2086
  "$cs" --tool "$1" --error-exitcode 97 --print-limit 50 "$PY" -m pytest $SAN_FILES -k "$2" \
    -p no:cacheprovider -q -x
  local rc=$?
  case $rc in
    0) echo "$1: clean" > "$DC_NOTE" ;;
    97) echo "$1 reported errors (see log.txt)" > "$DC_NOTE" ;;
    5) echo "no test selected" > "$DC_NOTE" ;;
    *) echo "pytest under $1 exit $rc" > "$DC_NOTE" ;;
  esac
  exit $rc
}
s_memcheck() { s_san memcheck "$SAN_K"; }
s_racecheck() { s_san racecheck "$SAN_K_RACE"; }
s_initcheck() { s_san initcheck "$SAN_K"; }
export -f s_env s_build s_tests s_bench s_floors s_topk_cuda s_fit_cuda s_cpp s_launch_sweep s_san_probe s_san \
  s_memcheck s_racecheck s_initcheck

# name, timeout (s), function. Sum of timeouts: 635 (the launch sweep runs only on what is left); the budget clip keeps the whole <= BUDGET.
# Seen on an H100 (2026-11-26): env 9 s, build 22, tests 107, floors 4, topk-cuda > 50 (cut in
# its CuPy peer at 10k queries), fit-cuda 13 (host corpus only), cpp 17, sanitizers 2-17 each.
step env          15 s_env
step build        40 s_build
step tests       170 s_tests  # 150 before tests/test_cuda_qtopk.py (~10-20 s more)
step floors       20 s_floors
step topk-cuda    80 s_topk_cuda
step fit-cuda     55 s_fit_cuda
step cpp          40 s_cpp
step san-probe    15 s_san_probe
step memcheck     30 s_memcheck
step racecheck    30 s_racecheck
step initcheck    20 s_initcheck
step launch-sweep 120 s_launch_sweep
touch "$OUT/.complete"
report
rm -f "$OUT/.complete"
rm -rf "$WORK"
echo "device check: $(( SECONDS - T0 ))s; report: $OUT/report.md" >&2
grep -v -P '\t(ok|skipped|not supported)\t' "$OUT/steps.tsv" | cut -f1,2 | sed 's/^/FAILED: /' >&2
exit 0

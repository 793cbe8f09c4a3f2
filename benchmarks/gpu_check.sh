#!/usr/bin/env bash
# GPU check, in one go and under 8 minutes on one H100/H200-class GPU (`make gpu-check`):
#
#   1. setup   the current python3 if its torch sees CUDA; else a venv (build/gpu-venv) with
#              PyPI's torch (a CUDA build) and -e ".[numba,triton,dev]"; missing test packages
#              are pip-installed (or taken from $SBMT_GPU_WHEELS, a folder of wheels, offline)
#   2. env     nvidia-smi, torch / CUDA / triton versions
#   3. tests   pytest tests/test_cuda.py tests/test_triton.py tests/test_gpu_sampler.py
#              -k "cuda or gpu", time-limited
#   4. bench   sbmt bench attention --device cuda (python -m sbm_transformer.bench) with the
#              time left as its --deadline; rewrites docs/benchmarks-gpu.md after every case
#   5. summary each phase's duration, the targets (PASS / FAIL / not measured)
#
# Usage:
#   bash benchmarks/gpu_check.sh            # full run (budget 435 s, hard stop ~465 s)
#   bash benchmarks/gpu_check.sh --quick    # ~1 minute smoke run; report in build/gpu-check/
#   bash benchmarks/gpu_check.sh --dry-run  # any machine: the plan, nothing run on a GPU
#   options: --budget SECONDS, --copy-to DIR (copy report, JSON and logs there)
#
# Environment: PYTHON (interpreter to try first), SBMT_GPU_BUDGET_S, SBMT_GPU_OUT (like
# --copy-to), SBMT_GPU_WHEELS, SBMT_GPU_TESTS_K (pytest -k expression), SBMT_GPU_BENCH_ARGS
# (extra bench options), SBMT_GPU_BANDWIDTH_TBPS (the card's bandwidth if its name is unknown).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

MODE=full
BUDGET=${SBMT_GPU_BUDGET_S:-}
COPY_TO=${SBMT_GPU_OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --dry-run) MODE=dry ;;
    --budget) BUDGET=$2; shift ;;
    --copy-to) COPY_TO=$2; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$BUDGET" ]; then
  if [ "$MODE" = quick ]; then BUDGET=70; else BUDGET=435; fi
fi

WORK=build/gpu-check
mkdir -p "$WORK"
LOG=$WORK/gpu_check.log
: >"$LOG"
if [ "$MODE" = full ]; then
  REPORT=docs/benchmarks-gpu.md
else
  REPORT=$WORK/benchmarks-gpu-$MODE.md
fi
JSON=$WORK/benchmarks-gpu-$MODE.json

T0=$(date +%s.%N)
PHASES=()
now() { date +%s.%N; }
elapsed() { awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%d", b - a }'; }
left() { echo $((BUDGET - $(elapsed))); }
say() { echo "[gpu-check $(elapsed)s] $*" | tee -a "$LOG"; }
PHASE_NAME=""
PHASE_T=""
phase() {  # phase NAME: ends the current phase (printing its duration), starts the next
  if [ -n "$PHASE_NAME" ]; then
    local d
    d=$(awk -v a="$PHASE_T" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    PHASES+=("$PHASE_NAME ${d}s")
    say "phase $PHASE_NAME: ${d} s"
  fi
  PHASE_NAME=$1
  PHASE_T=$(now)
  [ -n "$1" ] && say "== $1 (budget left $(left) s of $BUDGET s)"
}

# ------------------------------------------------------------------------------ 1. setup
phase setup
has_gpu() {
  { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; } ||
    [ -e /dev/nvidia0 ]
}
cuda_torch() {  # cuda_torch PYTHON: true if its torch imports and sees a CUDA device
  "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}
PY=""
if [ "$MODE" = dry ]; then
  for cand in ${PYTHON:-} .venv/bin/python python3; do
    if "$cand" -c 'import torch' >/dev/null 2>&1; then PY=$cand; break; fi
  done
  [ -n "$PY" ] || { say "dry run: no python with torch found"; exit 1; }
  say "dry run with $PY: the plan below; on a GPU the script would run:"
  say "  setup  : python3 if its torch sees CUDA, else build/gpu-venv (pip install torch," \
    "-e .[numba,triton,dev]): at most 240 s + 120 s"
  say "  tests  : pytest -q tests/test_cuda.py tests/test_triton.py tests/test_gpu_sampler.py -k 'cuda or gpu'" \
    "(time limit: min(90 s, a third of the budget left))"
  say "  bench  : python -m sbm_transformer.bench --device cuda --deadline <left - 15 s>" \
    "--out docs/benchmarks-gpu.md (hard stop 30 s after the deadline)"
  PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m sbm_transformer.bench \
    --device cuda --dry-run --out "$REPORT" --json "$JSON" 2>&1 | tail -n 12 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  phase ""
  say "dry run done (rc $rc): plan in $REPORT"
  exit "$rc"
fi

if ! has_gpu; then
  say "no NVIDIA GPU here (nvidia-smi -L, /dev/nvidia0): nothing to check;" \
    "docs/benchmarks-gpu.md left as it is (use --dry-run to see the plan)"
  exit 2
fi
for cand in ${PYTHON:-} python3 build/gpu-venv/bin/python; do
  if command -v "$cand" >/dev/null 2>&1 && cuda_torch "$cand"; then PY=$cand; break; fi
done
pip_timed() {  # pip_timed SECONDS ARGS...: pip install, time-limited, quiet, logged
  local t=$1
  shift
  timeout -k 5 "$t" "$PY" -m pip install -q --disable-pip-version-check "$@" >>"$LOG" 2>&1
}
if [ -z "$PY" ]; then
  say "no python whose torch sees CUDA: creating build/gpu-venv (pip install torch, then" \
    "-e .[numba,triton,dev]; a CUDA build of torch is a few GB)"
  python3 -m venv build/gpu-venv >>"$LOG" 2>&1 || { say "python3 -m venv failed"; exit 1; }
  PY=build/gpu-venv/bin/python
  if ! pip_timed 240 torch; then
    say "pip install torch failed or took over 240 s (see $LOG)"
    exit 1
  fi
  pip_timed 120 -e ".[numba,triton,dev]" || say "pip install -e .[numba,triton,dev] failed (see $LOG)"
  cuda_torch "$PY" || { say "the installed torch does not see the GPU (see $LOG)"; exit 1; }
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"  # this tree's package, installed or not
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["numpy", "tqdm", "pytest", "hypothesis", "triton"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
  say "missing packages: $missing; installing"
  if [ -n "${SBMT_GPU_WHEELS:-}" ]; then
    pip_timed 60 --no-index --find-links "$SBMT_GPU_WHEELS" $missing ||
      say "could not install $missing from $SBMT_GPU_WHEELS"
  else
    pip_timed 60 $missing || say "could not install $missing (no registry?): going on without"
  fi
fi
VERSIONS=$("$PY" - <<'EOF' 2>>"$LOG"
import torch
try:
    import triton
    tv = f"triton {triton.__version__}"
except Exception:
    tv = "no triton"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {tv}, "
      f"{torch.cuda.get_device_name(0)}")
EOF
)
say "python: $PY: $VERSIONS"

# -------------------------------------------------------------------------------- 2. env
phase env
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
  --format=csv,noheader 2>&1 | tee -a "$LOG"
SETUP_NOTE="setup: $PY, $VERSIONS; $(IFS=';'; echo "${PHASES[*]}")"

# ------------------------------------------------------------------------------ 3. tests
phase tests
TEST_FILES=()
for f in tests/test_cuda.py tests/test_triton.py tests/test_gpu_sampler.py; do [ -f "$f" ] && TEST_FILES+=("$f"); done
TEST_CAP=$(( $(left) / 3 ))
[ "$TEST_CAP" -gt 90 ] && TEST_CAP=90
[ "$MODE" = quick ] && TEST_CAP=$(( TEST_CAP > 15 ? 15 : TEST_CAP ))
K=${SBMT_GPU_TESTS_K:-cuda or gpu}
if [ "$MODE" = quick ]; then TEST_FILES=(tests/test_cuda.py); fi
TEST_NOTE="CUDA tests: not run"
if [ "$TEST_CAP" -ge 10 ] && "$PY" -c 'import pytest' >/dev/null 2>&1; then
  say "pytest ${TEST_FILES[*]} -k '$K' (time limit $TEST_CAP s)"
  timeout -k 5 "$TEST_CAP" "$PY" -m pytest -q -p no:cacheprovider "${TEST_FILES[@]}" -k "$K" \
    2>&1 | tee "$WORK/tests.log" | tail -n 25
  trc=${PIPESTATUS[0]}
  summary=$(grep -E "[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran" \
    "$WORK/tests.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  if [ "$trc" = 124 ] || [ "$trc" = 137 ]; then
    TEST_NOTE="CUDA tests: stopped at the $TEST_CAP s limit (${summary:-no summary})"
  else
    TEST_NOTE="CUDA tests (${TEST_FILES[*]}, -k '$K'): ${summary:-no summary} (rc $trc)"
  fi
  cat "$WORK/tests.log" >>"$LOG"
else
  say "tests skipped (pytest missing or under 10 s left)"
fi
say "$TEST_NOTE"

# ------------------------------------------------------------------------------ 4. bench
phase bench
DEADLINE=$(( $(left) - 15 ))
if [ "$DEADLINE" -lt 20 ]; then DEADLINE=20; fi
BENCH_ARGS=(--suite gpu --device cuda --deadline "$DEADLINE" --out "$REPORT" --json "$JSON")
[ "$MODE" = quick ] && BENCH_ARGS+=(--quick --arm-cap 5)
# shellcheck disable=SC2206
[ -n "${SBMT_GPU_BENCH_ARGS:-}" ] && BENCH_ARGS+=(${SBMT_GPU_BENCH_ARGS})
say "python -m sbm_transformer.bench ${BENCH_ARGS[*]} (hard stop after $((DEADLINE + 30)) s)"
PYTHONUNBUFFERED=1 timeout -k 10 $((DEADLINE + 30)) "$PY" -m sbm_transformer.bench \
  "${BENCH_ARGS[@]}" --note "$SETUP_NOTE" --note "$TEST_NOTE" 2>&1 | tee "$WORK/bench.log"
brc=${PIPESTATUS[0]}
cat "$WORK/bench.log" >>"$LOG"
if [ "$brc" = 124 ] || [ "$brc" = 137 ]; then
  say "bench stopped at its hard limit: $REPORT holds the cases measured until then"
elif [ "$brc" != 0 ]; then
  say "bench failed (rc $brc): see $WORK/bench.log"
fi

# ---------------------------------------------------------------------------- 5. summary
phase summary
if [ -f "$REPORT" ]; then
  echo "---- targets ($REPORT) ----"
  sed -n '/^## Targets/,$p' "$REPORT" | grep '^|'
fi
phase ""
echo "---- phases: ${PHASES[*]}; total $(elapsed) s (budget $BUDGET s) ----"
echo "$TEST_NOTE"
if [ -n "$COPY_TO" ]; then
  mkdir -p "$COPY_TO"
  cp -f "$REPORT" "$JSON" "$LOG" "$COPY_TO"/ 2>/dev/null
  echo "copied the report, JSON and log to $COPY_TO"
fi
exit "$brc"

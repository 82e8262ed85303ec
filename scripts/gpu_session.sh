#!/usr/bin/env bash
# Everything a lent GPU machine should do in one `device` call (its time is scarce, one call is
# at most 10 minutes): build ftkernels against the machine's own torch for its GPU's arch, show
# the build table, run the test suite (CUDA cases included), then the benchmark suites one by
# one, each bounded so the whole call ends before its limit and finished suites are kept.
#   bash scripts/gpu_session.sh                 # build, tests, every suite
#   STAGES=build,bench SUITES="e2e" bash scripts/gpu_session.sh
#   STAGES=build,diag bash scripts/gpu_session.sh   # per-kernel times (scripts/diag_kernels.py)
# Env: STAGES (build,tests,diag,bench), SUITES ("name" or "name:cap_s" each), BUDGET_S (whole-script deadline, default 560),
# TEST_PATHS (default tests), TEST_ARGS (extra pytest args), BENCH_ARGS (extra `ftkernels bench` args),
# BENCH_ARGS_<suite> (extra args for one suite).
# Files left in ${OUT:-bench/results/gpu}: session.log, tests.txt, <suite>.json (at most 8 files,
# which is what the device tool brings back).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
DEST="${OUT:-bench/results/gpu}"
STAGES="${STAGES:-build,tests,bench}"
SUITES="${SUITES:-lora_linear optimizer masked lora_conv loreft e2e}"
BUDGET_S="${BUDGET_S:-560}"
export PYTHONUNBUFFERED=1
mkdir -p "$DEST"
t0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }
exec > >(tee -a "$DEST/session.log") 2>&1

if [[ ",$STAGES," == *",build,"* ]]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
  fi
  echo "== build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-none}) $(( $(date +%s) - t0 ))s"
  if ! MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -40; then
    echo "build failed"
    exit 1
  fi
fi
"$PY" -m ftkernels info || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv 2>/dev/null || true

if [[ ",$STAGES," == *",tests,"* ]]; then
  echo "== tests $(( $(date +%s) - t0 ))s"
  # xdist when present (the CPU half of the suite is most of its time), 2 threads a worker so
  # 8 workers do not oversubscribe the cores; -v names each result as it lands (a timeout keeps them).
  XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest ${TEST_PATHS:-tests} -v -p no:cacheprovider -p no:benchmark \
    -W ignore::UserWarning -rfE --durations=15 $XDIST ${TEST_ARGS:-} > "$DEST/tests.txt" 2>&1
  echo "pytest exit $?"
  grep -E "FAILED|ERROR" "$DEST/tests.txt" | head -40
  tail -30 "$DEST/tests.txt"
fi

if [[ ",$STAGES," == *",diag,"* ]]; then
  echo "== diag $(( $(date +%s) - t0 ))s"
  timeout "${DIAG_TIMEOUT:-150}" "$PY" scripts/diag_kernels.py ${DIAG_ARGS:-} --json "$DEST/diag.json"
  echo "diag exit $?"
fi

if [[ ",$STAGES," == *",bench,"* ]]; then
  for entry in $SUITES; do
    # "suite" or "suite:cap_seconds" (a cap keeps one slow suite from eating the others' time)
    s="${entry%%:*}"; cap="${entry#*:}"; [[ "$cap" == "$entry" ]] && cap=100000
    budget=$(left); (( cap < budget )) && budget=$cap
    if (( budget < 20 )); then echo "== bench $s skipped: ${budget}s left"; continue; fi
    echo "== bench $s ($(( $(date +%s) - t0 ))s, ${budget}s left)"
    more="BENCH_ARGS_$s"  # per-suite extra args, e.g. BENCH_ARGS_lora_linear=--quick
    # shellcheck disable=SC2086
    timeout "$budget" "$PY" -m ftkernels bench --suite "$s" --out "/tmp/ftk-bench/$s" ${BENCH_ARGS:-} ${!more:-}
    echo "bench $s exit $?"
    cp "/tmp/ftk-bench/$s/results.json" "$DEST/$s.json" 2>/dev/null || true
  done
fi
echo "== done $(( $(date +%s) - t0 ))s; results in $DEST"

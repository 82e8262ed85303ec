#!/usr/bin/env bash
# Everything a lent GPU machine should do in one `device` call (its time is scarce):
# build ftkernels against the machine's own torch for its GPU's arch, show the build table,
# run the test suite (CUDA cases included), run the benchmark suite, and leave the results in
# ${OUT:-bench/results/gpu} (device, versions, date and commit inside).
#   bash scripts/gpu_session.sh [extra args for ftkernels bench]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
DEST="${OUT:-bench/results/gpu}"
mkdir -p "$DEST"
t0=$(date +%s)
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
fi
echo "== build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-none}) $(( $(date +%s) - t0 ))s"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20
"$PY" -m ftkernels info | tee "$DEST/info.txt"
echo "== tests $(( $(date +%s) - t0 ))s"
"$PY" -m pytest tests -q -x -p no:cacheprovider 2>&1 | tail -30 | tee "$DEST/tests.txt" || true
echo "== bench $(( $(date +%s) - t0 ))s"
"$PY" -m ftkernels bench --out "$DEST" "$@" 2>&1 | tee "$DEST/bench.txt"
echo "== done $(( $(date +%s) - t0 ))s; results in $DEST"

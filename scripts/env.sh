#!/usr/bin/env bash
# Source this: makes a Python with torch and ftkernels (built in place) ready, then `$PY` runs it.
# - If the current python already has torch (e.g. a GPU machine with its own CUDA torch), use it
#   and only build ftkernels against it.
# - Otherwise create $FTK_VENV (default .venv) with requirements/cpu.txt.
# Builds are incremental (ninja); set FTK_REBUILD=1 to force one.
set -euo pipefail
FTK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$FTK_ROOT"
BASE_PY="${PYTHON:-python3}"
if [ -z "${FTK_VENV:-}" ] && "$BASE_PY" -c "import torch" >/dev/null 2>&1; then
  PY="$BASE_PY"
  "$PY" -m pip install -q pybind11 ninja pytest pytest-benchmark numpy >/dev/null 2>&1 || true
else
  VENV="${FTK_VENV:-$FTK_ROOT/.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    "$BASE_PY" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
  stamp="$VENV/.ftk-requirements"
  if ! cat requirements/cpu.txt requirements/examples-nodeps.txt | cmp -s - "$stamp" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip >/dev/null
    # (DISABLE_CUDA=1: hqq's sdist would otherwise try to build its optional CUDA kernels)
    DISABLE_CUDA=1 "$PY" -m pip install -q -r requirements/cpu.txt
    "$PY" -m pip install -q --no-deps -r requirements/examples-nodeps.txt
    cat requirements/cpu.txt requirements/examples-nodeps.txt > "$stamp"
  fi
fi
# Rebuild the extension when a C++/CUDA source or the build script is newer than it.
so=$(ls ftkernels/_C*.so 2>/dev/null | head -n1 || true)
if [ -n "${FTK_REBUILD:-}" ] || [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -print -quit)" ] \
   || ! "$PY" -c "import ftkernels, sys; sys.exit(0 if ftkernels.build_info()['cpu_extension'] else 1)" >/dev/null 2>&1; then
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . 
fi
export PY

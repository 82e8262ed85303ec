#!/usr/bin/env bash
# The test command: CPU tests, Triton kernels through TRITON_INTERPRET=1 (GPU tests when a GPU is present).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m pytest tests -q "$@"

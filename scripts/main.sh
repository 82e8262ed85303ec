#!/usr/bin/env bash
# The main job: the benchmark suite on this machine's default device (GPU if present, else CPU
# with sizes scaled to finish in seconds), after the build table. Extra arguments go to
# `ftkernels bench` (e.g. --quick, --out DIR, --plot, --suite optimizer).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -m ftkernels info
exec "$PY" -m ftkernels bench "$@"

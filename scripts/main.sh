#!/usr/bin/env bash
# The main job: the benchmark suite on this machine's default device (until it exists: the build table).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m ftkernels info "$@"

#!/usr/bin/env bash
# Build the ftkernels CUDA wheel for a GPU cluster and check that every requested arch is in it.
#
#   scripts/build_wheels.sh ARCH_LIST [OUT_DIR] [TORCH_VERSION]
#   e.g. scripts/build_wheels.sh "8.0;9.0" wheelhouse 2.14.1
#
# ARCH_LIST is TORCH_CUDA_ARCH_LIST syntax ("8.0;8.6;9.0+PTX"). TORCH_VERSION, when given, is
# pip-installed first (into the active environment); otherwise the installed torch is used, and
# it must be a CUDA build. The wheel's version names torch and CUDA (0.1.0+cu130.torch2.14): it
# only loads with that torch. Needs nvcc; no GPU.
set -euo pipefail
ARCHS="${1:?usage: build_wheels.sh ARCH_LIST [OUT_DIR] [TORCH_VERSION]}"
OUT="$(mkdir -p "${2:-wheelhouse}" && cd "${2:-wheelhouse}" && pwd)"
TORCH_VERSION="${3:-}"
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"

if [ -n "$TORCH_VERSION" ]; then
  "$PY" -m pip install -q "torch==$TORCH_VERSION" pybind11 ninja setuptools wheel
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch ' + torch.__version__ + ' is not a CUDA build')"
command -v nvcc >/dev/null || { echo "nvcc not found: install the CUDA toolkit" >&2; exit 1; }

# cuobjdump: the toolkit's, else the one pip's nvidia-cuda-cuobjdump provides.
CUOBJDUMP="$(command -v cuobjdump || true)"
if [ -z "$CUOBJDUMP" ]; then
  CUOBJDUMP="$("$PY" - <<'PYEOF'
import glob, os, sysconfig
hits = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "**", "bin", "cuobjdump"), recursive=True)
print(hits[0] if hits else "")
PYEOF
)"
fi
[ -n "$CUOBJDUMP" ] || { echo "cuobjdump not found: pip install nvidia-cuda-cuobjdump" >&2; exit 1; }

BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
# Build from a copy so the source tree's own build/ and in-place extension are left alone.
(cd "$SRC" && git ls-files -z 2>/dev/null | xargs -0 tar -cf - 2>/dev/null || tar -cf - --exclude=.git --exclude='.venv*' --exclude=build .) | tar -xf - -C "$BUILD"
echo "building for TORCH_CUDA_ARCH_LIST=$ARCHS with $("$PY" -c 'import torch; print(torch.__version__)')"
(cd "$BUILD" && FTKERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$BUILD/dist")
WHEEL="$(ls "$BUILD"/dist/ftkernels-*.whl)"

# Every requested arch must be in the extension as SASS (sm_XY); "+PTX" also needs PTX.
mkdir "$BUILD/unpacked"
(cd "$BUILD/unpacked" && "$PY" -m zipfile -e "$WHEEL" .)
SO="$(ls "$BUILD"/unpacked/ftkernels/_C*.so)"
ELF="$("$CUOBJDUMP" --list-elf "$SO")"
PTX="$("$CUOBJDUMP" --list-ptx "$SO" 2>/dev/null || true)"
echo "$ELF"
status=0
IFS=';, ' read -r -a wanted <<< "$ARCHS"
for a in "${wanted[@]}"; do
  [ -z "$a" ] && continue
  sm="sm_$(echo "${a%+PTX}" | tr -d .)"
  if grep -q "\.$sm\.cubin" <<< "$ELF"; then echo "ok: $sm"; else echo "MISSING: $sm" >&2; status=1; fi
  if [[ "$a" == *+PTX ]]; then
    if grep -q "\.$sm\.ptx" <<< "$PTX"; then echo "ok: PTX $sm"; else echo "MISSING: PTX $sm" >&2; status=1; fi
  fi
done
[ $status -eq 0 ] || exit $status
cp "$WHEEL" "$OUT/"
echo "wheel: $OUT/$(basename "$WHEEL")"

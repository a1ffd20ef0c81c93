#!/usr/bin/env bash
# Installs real Horovod 0.28.1 (CPU ops over gloo, no MPI) into the active Python environment.
#
# Horovod 0.28.1 (the last release) does not build against torch >= 2.1 as shipped. This script
# patches its sdist the way that works here:
#   * the system cmake (>= 3.13, < 4) is used, never pip's cmake 4;
#   * CMAKE_POLICY_VERSION_MINIMUM=3.5 so old cmake_minimum_required lines are accepted;
#   * CMAKE_CXX_STANDARD 14 -> 17 in CMakeLists.txt and horovod/torch/CMakeLists.txt
#     (torch >= 2.1 headers need C++17).
# The built wheel is cached in $CSER_HOROVOD_CACHE (default ~/.cache/cser_hooks/wheels), so a second
# install takes seconds. Idempotent: does nothing when horovod.torch already imports with gloo.
#
# Environment knobs:
#   PYTHON                  interpreter to install into (default: python)
#   CSER_HOROVOD_CACHE      wheel cache directory
#   HOROVOD_GPU_OPERATIONS  e.g. NCCL in the Docker image (default: unset, CPU ops over gloo)
#   CSER_HOROVOD_FORCE=1    rebuild even if a cached wheel or an install exists
set -euo pipefail

HOROVOD_VERSION=0.28.1
PY=${PYTHON:-python}
CACHE=${CSER_HOROVOD_CACHE:-$HOME/.cache/cser_hooks/wheels}
log() { printf '[install_horovod] %s\n' "$*"; }

is_installed() {
  "$PY" - <<'PY' 2>/dev/null
import horovod, horovod.torch as hvd
assert horovod.__version__ == "0.28.1", horovod.__version__
assert hvd.gloo_built(), "gloo not built"
PY
}

if [[ "${CSER_HOROVOD_FORCE:-0}" != 1 ]] && is_installed; then
  log "horovod $HOROVOD_VERSION with gloo already importable in $("$PY" -c 'import sys; print(sys.prefix)'): nothing to do"
  exit 0
fi

TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])') || {
  log "torch must be installed first (pip install torch==2.13.0)"; exit 1; }
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
# A wheel is only valid for the torch it was built against: key the cache on both.
WHEEL_DIR="$CACHE/horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-$PYTAG${HOROVOD_GPU_OPERATIONS:+-$HOROVOD_GPU_OPERATIONS}"

# Horovod's runtime dependencies (horovodrun needs them); pip is only asked when one is missing.
if ! "$PY" -c 'import cloudpickle, psutil, yaml, packaging, cffi' 2>/dev/null; then
  log "installing Horovod's runtime dependencies"
  "$PY" -m pip install -q "cloudpickle" "psutil" "pyyaml" "packaging" "cffi>=1.4.0"
fi

WHEEL=$(ls "$WHEEL_DIR"/horovod-*.whl 2>/dev/null | head -n 1 || true)
if [[ -n "$WHEEL" && "${CSER_HOROVOD_FORCE:-0}" != 1 ]]; then
  log "installing cached wheel $WHEEL"
  "$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL"
else
  CMAKE_BIN=$(command -v cmake || true)
  [[ -n "$CMAKE_BIN" ]] || { log "need a system cmake 3.13..3.x on PATH"; exit 1; }
  CMAKE_MAJOR=$("$CMAKE_BIN" --version | head -n 1 | sed -E 's/[^0-9]*([0-9]+)\..*/\1/')
  if [[ "$CMAKE_MAJOR" -ge 4 ]]; then
    for c in /usr/bin/cmake /usr/local/bin/cmake; do
      if [[ -x $c ]] && [[ $($c --version | head -n 1 | sed -E 's/[^0-9]*([0-9]+)\..*/\1/') -lt 4 ]]; then CMAKE_BIN=$c; break; fi
    done
  fi
  log "using cmake $CMAKE_BIN ($("$CMAKE_BIN" --version | head -n 1))"
  # Make sure no pip-installed cmake 4 shadows the system one inside the build.
  "$PY" -m pip uninstall -y -q cmake >/dev/null 2>&1 || true
  # --no-build-isolation builds with this environment's setuptools: a fresh venv has setuptools 65,
  # whose bdist_wheel comes from the separate `wheel` package (gone from wheel >= 0.46), so bring both.
  log "making sure setuptools>=70.1 and wheel are present for the build"
  "$PY" -m pip install -q "setuptools>=70.1" wheel

  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  log "downloading horovod==$HOROVOD_VERSION sdist"
  "$PY" -m pip download -q --no-deps --no-binary horovod "horovod==$HOROVOD_VERSION" -d "$WORK"
  tar -xzf "$WORK"/horovod-$HOROVOD_VERSION.tar.gz -C "$WORK"
  SRC="$WORK/horovod-$HOROVOD_VERSION"
  log "patching CMAKE_CXX_STANDARD 14 -> 17"
  sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"

  mkdir -p "$WHEEL_DIR"
  log "building wheel (about 6 minutes on 2 cores)"
  ( cd "$SRC" && \
    PATH="$(dirname "$CMAKE_BIN"):$PATH" \
    CMAKE_POLICY_VERSION_MINIMUM=3.5 \
    HOROVOD_CMAKE="$CMAKE_BIN" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEEL_DIR" . )
  WHEEL=$(ls "$WHEEL_DIR"/horovod-*.whl | head -n 1)
  log "built $WHEEL; installing"
  "$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL"
fi

is_installed || { log "horovod installed but horovod.torch does not import with gloo"; exit 1; }
log "horovod $HOROVOD_VERSION ready (gloo built)"

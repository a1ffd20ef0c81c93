#!/usr/bin/env bash
# Creates the development environment: .venv in the repository root with everything the tests need.
#
#   1. .venv from the system Python (python3.11, else python3 >= 3.10), reused when it already works;
#   2. torch==2.13.0 (on this project's machines pip takes the CPU wheel lying in /opt/wheels);
#   3. pip install -e ".[test,bench]" with torch pinned by a constraints file, so no extra can pull
#      another (multi-GB CUDA) torch;
#   4. real Horovod 0.28.1 over gloo: scripts/install_horovod.sh (a cached wheel, else a ~6 min build);
#   5. a smoke check of the imports.
# Idempotent: a second run re-checks everything and installs nothing new (step 3 is skipped while
# setup.py and pyproject.toml are unchanged since the last successful run).
#
# Environment knobs:
#   PYTHON_BOOTSTRAP     interpreter that creates the venv (default: python3.11, else python3)
#   CSER_VENV            venv directory (default: <repo>/.venv)
#   CSER_SETUP_FORCE=1   reinstall the project requirements even if nothing changed
#   CSER_SKIP_HOROVOD=1  skip step 4 (the horovod tests then skip locally and fail under CI=true)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${CSER_VENV:-$ROOT/.venv}
TORCH_PIN="torch==2.13.0"
export PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off
START=$(date +%s)
log() { printf '[setup +%ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# --- 1. the venv -------------------------------------------------------------------------------------
pick_python() {
  local c
  for c in ${PYTHON_BOOTSTRAP:-} python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 &&
       "$c" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
  log "reusing $VENV ($("$VENV/bin/python" -V))"
else
  BOOT=$(pick_python) || die "need python3.11 (or python3 >= 3.10) with the venv module on PATH"
  log "creating $VENV with $BOOT ($("$BOOT" -V))"
  "$BOOT" -m venv --clear "$VENV"
fi
PY="$VENV/bin/python"
pip_() { "$PY" -m pip "$@"; }

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH_PIN" > "$CONSTRAINTS"

# --- 2. torch ----------------------------------------------------------------------------------------
torch_version() { "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }
TV=$(torch_version)
if [[ "$TV" == 2.13.0* ]]; then
  log "torch $TV already installed"
else
  log "installing $TORCH_PIN${TV:+ (replacing $TV)}"
  pip_ install -q -c "$CONSTRAINTS" "$TORCH_PIN"
  TV=$(torch_version)
fi
[[ "$TV" == 2.13.0* ]] || die "torch resolved to '$TV', expected 2.13.0"
if [[ "$TV" != *+cpu ]]; then
  log "WARNING: torch $TV is not the CPU build (expected 2.13.0+cpu from the local wheel directory)"
fi

# --- 3. the project with its test and bench extras ----------------------------------------------------
STAMP="$VENV/.cser_setup_stamp"
WANT=$(cat setup.py pyproject.toml 2>/dev/null | sha256sum | cut -d' ' -f1)
if [[ "${CSER_SETUP_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] &&
   "$PY" -c 'import cser_hooks, pytest, pytest_timeout, ruff' 2>/dev/null; then
  log "project requirements unchanged since the last run ($STAMP): skipping pip install -e"
else
  log "pip install -e \".[test,bench]\" (torch pinned to 2.13.0 by a constraints file)"
  pip_ install -q -c "$CONSTRAINTS" -e ".[test,bench]"
  echo "$WANT" > "$STAMP"
fi
TV2=$(torch_version)
[[ "$TV2" == "$TV" ]] || die "installing the project changed torch from $TV to $TV2"

# --- 4. Horovod ----------------------------------------------------------------------------------------
if [[ "${CSER_SKIP_HOROVOD:-0}" == 1 ]]; then
  log "CSER_SKIP_HOROVOD=1: not installing Horovod"
else
  log "installing Horovod (scripts/install_horovod.sh)"
  PYTHON="$PY" bash "$ROOT/scripts/install_horovod.sh"
  TV3=$(torch_version)
  [[ "$TV3" == "$TV" ]] || die "installing Horovod changed torch from $TV to $TV3"
fi

# --- 5. smoke check ------------------------------------------------------------------------------------
log "checking the imports"
"$PY" - <<'PY'
import importlib.metadata as md

import numba
import torch

import cser_hooks  # noqa: F401

print(f"  python {__import__('sys').version.split()[0]}, torch {torch.__version__}, numba {numba.__version__}")
for dist in ("numba-cuda", "nvidia-nvvm", "pytest", "pytest-timeout", "ruff", "horovod"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist} (not installed)")
PY
pip_ check >/dev/null 2>&1 || log "note: pip check reports conflicts: $(pip_ check 2>&1 | head -n 5 | tr '\n' ';')"
log "done: activate with 'source $VENV/bin/activate'; run the tests with 'bash scripts/test.sh'"

#!/usr/bin/env bash
# The one-GPU check (scripts/gpu_check.py): bash scripts/gpu_check.sh [--dry-run] [--out docs/gpu-check.md]
# On a machine with one CUDA GPU it takes a few minutes; --dry-run runs the same sections on the CPU (CI does).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-$here/../.venv/bin/python}"
[[ -x $py ]] || py=python3
exec "$py" "$here/gpu_check.py" "$@"

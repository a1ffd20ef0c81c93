#!/usr/bin/env bash
# The benchmark's standard runs (python -m cser_hooks.bench; see `python -m cser_hooks.bench --help`).
#
#   scripts/bench.sh quick   [args]   1-2 min smoke run that checks its own output (CI)
#   scripts/bench.sh default [args]   the README run: default methods, MNIST-1D, 1-D CNN, 4 workers (<= 10 min)
#   scripts/bench.sh link    [args]   5.4M-parameter MLP over emulated 100 Mbit/s links (root), each method
#                                     stopped at the target accuracy: time-to-target and veth byte checks
#   scripts/bench.sh cleanup          remove namespaces left by a killed --link run (root)
#
# Extra args go to the benchmark, e.g. `scripts/bench.sh default --methods dense,cser-32`.
# PYTHON selects the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
what=${1:-default}
shift || true
case "$what" in
  quick)   exec "$PY" -m cser_hooks.bench --quick "$@" ;;
  default) exec "$PY" -m cser_hooks.bench "$@" ;;
  link)    exec "$PY" -m cser_hooks.bench --model mlp-wide --link 100mbit --stop-at-target \
                --methods dense,powersgd,cser-32 "$@" ;;
  cleanup) exec "$PY" -m cser_hooks.bench --cleanup ;;
  *) echo "usage: $0 quick|default|link|cleanup [benchmark args]" >&2; exit 2 ;;
esac

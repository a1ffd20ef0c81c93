#!/usr/bin/env bash
# The project's one test command (README, CI):  bash scripts/test.sh [pytest selection...]
#
#   1. ruff check .
#   2. pytest -m "not cudasim"                          everything else: gloo ranks, Horovod, ptx, ...
#   3. NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim         kernels in the Numba CUDA simulator (the
#      simulator is chosen when numba is imported, so it needs a process of its own)
# Extra arguments (paths, -k EXPR, -x, ...) go to both pytest passes. Every step runs even if an earlier
# one failed; the exit status is non-zero if any failed. The last line sums both passes:
# "summary: N passed, N failed, N skipped".
#
# Environment knobs:
#   PYTHON                 interpreter (default: <repo>/.venv/bin/python, made by scripts/setup.sh)
#   CSER_PASS_TIMEOUT      hard limit in seconds for one pytest pass (default 3600); pytest-timeout
#                          limits each test (pyproject.toml)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
if [[ ! -x "$PY" ]]; then
  echo "[test] $PY not found: run 'bash scripts/setup.sh' first (or set PYTHON=...)" >&2
  exit 2
fi
LIMIT=${CSER_PASS_TIMEOUT:-3600}
REPORTS="$ROOT/reports"
mkdir -p "$REPORTS"
rm -f "$REPORTS"/junit-main.xml "$REPORTS"/junit-cudasim.xml "$REPORTS"/summary.txt
log() { printf '[test] %s\n' "$*"; }
declare -A RESULT
FAILED=0
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

# --- 1. ruff -------------------------------------------------------------------------------------------
t0=$(date +%s)
log "ruff check ."
if "$PY" -m ruff check .; then RESULT[ruff]="ok"; else RESULT[ruff]="FAILED"; FAILED=1; fi
RESULT[ruff]+=" ($(elapsed "$t0"))"

# --- 2 and 3. the two pytest passes -----------------------------------------------------------------------
run_pass() {  # name, extra env assignments..., -- pytest args...
  local name=$1; shift
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  local t0 rc
  t0=$(date +%s)
  log "pass '$name': ${envs[*]:-} pytest $*"
  env "${envs[@]}" timeout --foreground -k 60 "$LIMIT" "$PY" -m pytest "$@"
  rc=$?
  RC[$name]=$rc
  TIME[$name]=$(elapsed "$t0")
}
declare -A RC TIME

run_pass main CSER_TEST_PASS=main -- -m "not cudasim" --junitxml="$REPORTS/junit-main.xml" "$@"
run_pass cudasim NUMBA_ENABLE_CUDASIM=1 CSER_TEST_PASS=cudasim -- -m cudasim \
  --junitxml="$REPORTS/junit-cudasim.xml" "$@"

# pytest exit code 5 = no test collected. Acceptable for the simulator pass only when there really
# are no cudasim tests (or when the caller narrowed the selection with arguments).
# (decorators, module-level pytestmark, pytest.param(..., marks=...); comments do not count)
has_cudasim_tests() {
  grep -rqsE --include='*.py' '^[[:space:]]*(@pytest\.mark\.cudasim|pytestmark[[:space:]]*=.*mark\.cudasim)|marks=.*mark\.cudasim' tests
}
for name in main cudasim; do
  rc=${RC[$name]}
  if [[ $rc == 0 ]]; then
    RESULT[$name]="ok"
  elif [[ $rc == 5 && $# -gt 0 ]]; then
    RESULT[$name]="no tests selected by '$*'"
  elif [[ $rc == 5 && $name == cudasim ]] && ! has_cudasim_tests; then
    RESULT[$name]="no cudasim tests in tests/"
  elif [[ $rc == 5 ]]; then
    RESULT[$name]="FAILED: no tests collected (exit 5)"; FAILED=1
  elif [[ $rc == 124 || $rc == 137 ]]; then
    RESULT[$name]="FAILED: killed after the ${LIMIT}s pass limit"; FAILED=1
  else
    RESULT[$name]="FAILED (pytest exit $rc)"; FAILED=1
  fi
  RESULT[$name]+=" (${TIME[$name]})"
done

# --- summary ------------------------------------------------------------------------------------------------
COUNTS=$("$PY" - "$REPORTS/junit-main.xml" "$REPORTS/junit-cudasim.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

tot = dict(tests=0, failures=0, errors=0, skipped=0)
for path in sys.argv[1:]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        continue
    for suite in root.iter("testsuite"):
        for k in tot:
            tot[k] += int(suite.get(k, 0))
failed = tot["failures"] + tot["errors"]
passed = tot["tests"] - failed - tot["skipped"]
print(passed, failed, tot["skipped"])
PY
) || COUNTS="0 0 0"
read -r PASSED NFAILED SKIPPED <<<"$COUNTS"
if [[ $FAILED == 0 && $PASSED == 0 ]]; then
  RESULT[total]="FAILED: no test passed"; FAILED=1
fi

echo
log "ruff:          ${RESULT[ruff]}"
log "pytest main:    ${RESULT[main]}"
log "pytest cudasim: ${RESULT[cudasim]}"
[[ -n ${RESULT[total]:-} ]] && log "${RESULT[total]}"
log "junit reports: reports/junit-main.xml reports/junit-cudasim.xml"
[[ $FAILED != 0 ]] && log "FAILED: see the lines above" || log "all green"
echo "summary: $PASSED passed, $NFAILED failed, $SKIPPED skipped" | tee "$REPORTS/summary.txt"
exit $FAILED

"""Every seed algorithm still *learns*: a short training run per algorithm must reach an accuracy
near dense's (equivalence with a reference alone could hide a method that does not train).

The run is the project's own benchmark (``python -m cser_hooks.bench``) on scikit-learn's digits
(offline), the small MLP, 2 gloo workers, 300 steps, warm-up + cosine lr, seed 0: deterministic (the
workers run one thread each and every collective sums in a fixed order), about a minute in all.
Each algorithm runs at its bench preset, the configuration the README's table shows. The bound is
relative to dense's accuracy in the same run, with a floor far above chance (10 %), so a method
that stops learning, diverges or collapses to a constant prediction fails.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 300
# method -> allowed accuracy loss against dense in this run (points)
MARGIN = {
    "cser-32": 3.0,
    "cser-256": 5.0,
    "m-cser": 3.0,
    "dist-ef-sgdm": 5.0,
    "qsparse": 5.0,
    "qprsgd": 3.0,
    "compskip": 5.0,
    "ef-topk": 5.0,
}
FLOOR = 70.0  # % on 10 classes
pytestmark = [pytest.mark.timeout(1300), pytest.mark.slow]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "cser_hooks.bench", "--data", "digits", "--model", "mlp", "--workers", "2",
           "--steps", str(STEPS), "--lr", "0.05", "--methods", ",".join(["dense", *MARGIN]), "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["methods"]
    return {row["method"]: row for row in rows}


def _acc(row) -> float:
    assert row["status"] == "ok", row
    return 100.0 * row["acc_final"]


def test_dense_learns(results):
    assert _acc(results["dense"]) >= 90.0


@pytest.mark.parametrize("method", list(MARGIN))
def test_algorithm_trains_near_dense(results, method):
    dense, got = _acc(results["dense"]), _acc(results[method])
    assert got >= FLOOR, f"{method}: {got:.1f} % does not learn (dense {dense:.1f} %)"
    assert got >= dense - MARGIN[method], f"{method}: {got:.1f} % vs dense {dense:.1f} % (allowed -{MARGIN[method]})"

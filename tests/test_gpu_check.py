"""scripts/gpu_check.sh --dry-run: the one-GPU check keeps working where no GPU is (issue: field-ready on GPUs).

The dry run executes the check's own code paths on the CPU (hooks over gloo, world size 1, the kernel
throughput rows, the AMP skip policy) and writes the report; a GPU machine runs the same script in full.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(400)
def test_gpu_check_dry_run_writes_a_passing_report(tmp_path):
    out = tmp_path / "gpu-check.md"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=380,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = out.read_text()
    assert "overall: PASS" in text
    for section in ("| 1 |", "| 2 |", "| 3 |", "| 4 |", "| 5 |"):
        assert section in text, section
    assert "FAIL" not in text

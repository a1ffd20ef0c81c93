"""The sign/QSGD equivalence suites give the same verdict on any CPU instruction set.

A CI machine may have AVX-512 or only AVX2; torch picks its vectorised kernels (and so the order of
its reductions) from ``ATEN_CPU_CAPABILITY``, Numba from the host. Hook and reference agree by
construction, not by luck: every block statistic (sign scales, QSGD norms) is accumulated in float64
and rounded to fp32 once, on both sides, and every element-wise step is evaluated in the same order.
This module re-runs the dist-EF-SGDM, Qsparse and QPRSGD reference comparisons (and their
wrong-reference tests, so the teeth stay) at W = 4 in a child pytest whose processes use another
instruction set than this one: ``avx2`` on an AVX-512 machine, the scalar ``default`` on an AVX2
machine (``avx2`` would be this machine's own default there). The parent pass runs the same suites
under the machine's default, so both verdicts are checked in one CI run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITES = ["tests/test_dist_ef_sgdm.py", "tests/test_qsparse.py", "tests/test_qprsgd.py"]
SELECT = "W4 and (matches_reference or wrong_reference)"


def capability(env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def other_capability(mine: str) -> str:
    return "default" if mine.upper() == "AVX2" else "avx2"


def test_other_capability_is_really_another():
    mine = capability()
    alt = other_capability(mine)
    got = capability({**os.environ, "ATEN_CPU_CAPABILITY": alt})
    assert got.upper() == alt.upper() != mine.upper(), (mine, alt, got)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sign_and_qsgd_suites_pass_under_another_instruction_set():
    if os.environ.get("CSER_ISA_CHILD"):
        pytest.skip("this is the child run")
    alt = other_capability(capability())
    env = {**os.environ, "ATEN_CPU_CAPABILITY": alt, "CSER_ISA_CHILD": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", SELECT, *SUITES]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    tail = "\n".join((r.stdout + r.stderr).splitlines()[-30:])
    assert r.returncode == 0, f"ATEN_CPU_CAPABILITY={alt}: the equivalence suites failed\n{tail}"
    assert " passed" in tail and "failed" not in tail, tail

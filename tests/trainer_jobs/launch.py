"""Run a trainer job script of this folder in its own process group, with a timeout (tests/test_lightning.py,
tests/test_accelerate.py), and decide whether the trainer package it needs is there.

``run_job(argv, cwd, timeout)`` starts ``argv`` (the launcher, the script, its arguments) in a new
session with one thread per process and the repository on PYTHONPATH, and returns its output. A job
that exits non-zero fails the test with the last lines of its log; one that runs past ``timeout`` is
killed with all its children (Lightning's and torchrun's rank processes included) and fails the test.

``require(module, extra)``: skip when ``module`` cannot be found, except under CI=true, where it fails
(as the ``horovod`` marker of tests/conftest.py: CI installs setup.py's "test" extra).
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parent
REPO = JOBS.parent.parent
ON_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(module: str, package: str) -> None:
    if importlib.util.find_spec(module.split(".")[0]) is not None and importlib.util.find_spec(module) is not None:
        return
    problem = f"{module} is not importable in {sys.executable}"
    if ON_CI:
        pytest.fail(f"{package} test cannot run under CI=true: {problem}. Install setup.py's 'test' extra "
                    f"(pip install -e '.[test]' pins {package})", pytrace=False)
    pytest.skip(f"{package} test: {problem} (pip install -e '.[test]')")


def run_job(argv: list[str], cwd: Path, timeout: float) -> str:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))})
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(var, None)  # the job's launcher sets its own
    log = cwd / "job.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException:  # past the timeout, or the test was interrupted: the whole job goes
            os.killpg(proc.pid, signal.SIGKILL)  # its rank processes share the launcher's session
            proc.wait()
            rc = None
            if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                raise
    text = log.read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-60:])
    if rc is None:
        pytest.fail(f"{' '.join(map(str, argv))} ran past {timeout} s and was killed; log tail:\n{tail}")
    if rc != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {rc}; log tail:\n{tail}")
    return text

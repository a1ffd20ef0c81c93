"""Run a script as a real Horovod job (``horovodrun --gloo``) and collect each rank's result.

``run_horovod(script, np, args=(), timeout=300) -> list[dict]`` runs

    horovodrun -np <np> -H localhost:<np> --gloo <python> <script> <args...>

with ``horovodrun`` and ``<python>`` taken from the running interpreter's environment. The script
saves its result with :func:`hvd_scripts/hvd_result.save_result` (``torch.save`` of a dict to
``$CSER_HVD_RESULT_DIR/rank<r>.pt``); the helper returns those dicts ordered by rank. A non-zero exit,
a missing rank result or a timeout fails with the captured output of the whole job; on timeout the
job's processes (horovodrun, its launcher middlemen and the workers) are all killed.

Used by the ``horovod`` tests (docs/algorithms.md §8: the Horovod front end must issue the same ordered
collectives on every rank); whether Horovod is usable is decided by tests/conftest.py (skip locally,
fail under CI=true).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["HorovodJobError", "RESULT_DIR_ENV", "horovodrun_path", "run_horovod"]

RESULT_DIR_ENV = "CSER_HVD_RESULT_DIR"  # keep equal to hvd_scripts/hvd_result.py
SCRIPTS_DIR = Path(__file__).resolve().parent / "hvd_scripts"
OUTPUT_TAIL = 20_000  # characters of job output kept in error messages


class HorovodJobError(RuntimeError):
    """The horovodrun job failed, timed out, or a rank wrote no result. The message has its output."""


def horovodrun_path() -> Path:
    return Path(sys.executable).parent / "horovodrun"


def run_horovod(script, np: int, args=(), timeout: float = 300, env: dict | None = None) -> list[dict]:
    """Run ``script`` on ``np`` Horovod ranks over gloo on localhost; return the rank results by rank.

    ``script`` is a path, or a file name inside tests/hvd_scripts/. ``env`` adds environment variables.
    """
    script = Path(script)
    if not script.is_absolute() and not script.exists():
        script = SCRIPTS_DIR / script
    if not script.is_file():
        raise FileNotFoundError(f"run_horovod: no script {script}")
    runner = horovodrun_path()
    if not runner.exists():
        raise FileNotFoundError(f"run_horovod: {runner} not found; "
                                "install Horovod with scripts/install_horovod.sh")
    if not isinstance(np, int) or np < 1:
        raise ValueError(f"run_horovod: np must be a positive int, got {np!r}")

    with tempfile.TemporaryDirectory(prefix="run_horovod_") as tmp:
        out_dir = Path(tmp) / "results"
        out_dir.mkdir()
        log_path = Path(tmp) / "job.log"
        cmd = [str(runner), "-np", str(np), "-H", f"localhost:{np}", "--gloo",
               sys.executable, str(script), *map(str, args)]
        job_env = dict(os.environ)
        job_env.update({
            RESULT_DIR_ENV: str(out_dir),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
            # scripts import their helpers from tests/ and tests/hvd_scripts/
            "PYTHONPATH": os.pathsep.join([str(SCRIPTS_DIR), str(SCRIPTS_DIR.parent)]
                                          + ([job_env["PYTHONPATH"]] if job_env.get("PYTHONPATH") else [])),
        })
        if env:
            job_env.update({k: str(v) for k, v in env.items()})
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=job_env, start_new_session=True)
            start = time.monotonic()
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_job(proc)
                raise HorovodJobError(f"{_describe(cmd)} did not finish within {timeout:g} s (killed):\n"
                                      f"{_tail(log_path)}") from None
            except BaseException:
                _kill_job(proc)
                raise
        elapsed = time.monotonic() - start
        if code != 0:
            raise HorovodJobError(f"{_describe(cmd)} exited with code {code} after {elapsed:.1f} s:\n"
                                  f"{_tail(log_path)}")
        results = []
        for rank in range(np):
            path = out_dir / f"rank{rank}.pt"
            if not path.exists():
                raise HorovodJobError(f"{_describe(cmd)}: rank {rank} wrote no result ({path.name}); "
                                      f"the script must call save_result():\n{_tail(log_path)}")
            results.append(_load(path))
        return results


def _load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def _describe(cmd) -> str:
    return "horovodrun job `" + " ".join(cmd[1:]) + "`"


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace")
    if len(text) > OUTPUT_TAIL:
        text = "[... output cut ...]\n" + text[-OUTPUT_TAIL:]
    return "----- job output -----\n" + text + "----- end of job output -----"


def _kill_job(proc: subprocess.Popen) -> None:
    """Kill horovodrun and every process below it (workers may run in sessions of their own)."""
    victims = []
    try:
        import psutil

        victims = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or the process already gone
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for child in victims:
            try:
                os.kill(child.pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=5)
            if sig == signal.SIGTERM and not any(_alive(c) for c in victims):
                return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _alive(child) -> bool:
    try:
        return child.is_running() and child.status() != "zombie"
    except Exception:
        return False
